import sys, time, numpy as np, torch
sys.path.insert(0,'/work/main'); sys.path.insert(0,'/work/main/tests')
from test_train_learning import learning_config, mouth_area, psnr
from talkformer_core.face import topology
from talkformer_core.models.checkpoint import read_checkpoint, checkpoint_config, load_model_state
from talkformer_core.models.model import TalkFormer
from talkformer_core.diffusion import NoiseSchedule, sample_ddim, upper_half_mask, ldm_loss
torch.set_num_threads(2); torch.manual_seed(0)
S=32; steps=int(sys.argv[1]); B=int(sys.argv[2]); lr=float(sys.argv[3]); aepath=sys.argv[4]
mc=sys.argv[5] if len(sys.argv)>5 else ''
tens, meta = read_checkpoint(aepath); aecfg=checkpoint_config(meta).model.autoencoder
cfg=learning_config(); cfg.model.autoencoder=aecfg
if mc: exec(mc)
model=TalkFormer(cfg); load_model_state(model.autoencoder, tens, 'autoencoder'); model.eval()
print('unet params', sum(p.numel() for p in model.unet.parameters()), 'app', sum(p.numel() for p in model.appearance.parameters()) if model.appearance else 0)
def img(c): return torch.from_numpy(c).float().div(127.5).sub(1).permute(0,3,1,2)
def load(p):
    z=np.load(p); x=img(z['crops']); m=x.clone(); m[:,:,S//2:]=-1
    with torch.no_grad(): return model.encode(x), model.encode(m), torch.from_numpy(z['points131_crop']).float(), z
tr=[load(f'/tmp/lt/data/train32/syn{s}.npz') for s in (0,1)]
t0=time.time(); c0=time.process_time()
sched=NoiseSchedule(cfg.model.diffusion); L=cfg.model.sequence_length
params=list(model.unet.parameters())+(list(model.appearance.parameters()) if model.appearance else [])
opt=torch.optim.Adam(params, lr=lr)
g=torch.Generator().manual_seed(0); rng=np.random.default_rng(0)
model.unet.train()
losses=[]
for it in range(steps):
    z0s,cts,lms,zrs=[],[],[],[]
    for b in range(B):
        ci=rng.integers(2); Z0,CT,LM,_=tr[ci]; T=len(Z0); s=rng.integers(T-L+1); r=rng.integers(T)
        z0s.append(Z0[s:s+L]); cts.append(CT[s:s+L]); lms.append(LM[s:s+L]); zrs.append(Z0[r:r+1])
    z0=torch.cat(z0s); ct=torch.cat(cts); lm=torch.cat(lms); zr=torch.cat(zrs)
    t=torch.randint(0,1000,(B,),generator=g).repeat_interleave(L)
    noise=torch.randn(z0.shape,generator=g)
    ref=model.prepare_reference(zr)
    loss,_=ldm_loss(lambda x,tt: model.unet(x,tt,lm,ref,num_frames=L), z0, ct, sched, t=t, noise=noise)
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params,1.0); opt.step(); losses.append(loss.item())
    if it%250==0:
        with torch.no_grad():
            Z,C_,LMt,_=tr[0]; a,b_=int(np.argmax(LMt[:,topology.LIP_POS[0],1]*0+torch.from_numpy(np.load('/tmp/lt/data/test_opening.npy')[:1]).item()*0)),0
            zt=torch.where(torch.arange(8)[:,None]>=4, sched.q_sample(Z[:5], torch.full((5,),600), torch.randn(Z[:5].shape,generator=torch.Generator().manual_seed(1))), C_[:5])
            e1=model.unet(zt,torch.full((5,),600),LMt[:5],model.prepare_reference(Z[:1]),num_frames=5); e2=model.unet(zt,torch.full((5,),600),LMt[50:55],model.prepare_reference(Z[:1]),num_frames=5)
        print(it, np.mean(losses[-250:]), 'sens', (e1-e2)[:,:,4:].pow(2).mean().item(), time.time()-t0, flush=True)
print('train', time.time()-t0, 'cpu', time.process_time()-c0)
model.eval()
Z0,CT,LM,z=load('/tmp/lt/data/test32/test.npz'); cr=z['crops']; T=len(Z0)
op=np.load('/tmp/lt/data/test_opening.npy')
ref=model.prepare_reference(Z0[T-1:T])  # last frame as reference
refimg=cr[T-1]
op_=np.load('/tmp/lt/data/test_opening.npy'); io,ic=int(op_.argmax()),int(op_.argmin())
with torch.no_grad():
  for tt in (200,500,800):
    zt=torch.where(torch.arange(8)[:,None]>=4, sched.q_sample(Z0[[io]], torch.tensor([tt]), torch.randn(1,*Z0.shape[1:],generator=torch.Generator().manual_seed(1))), CT[[io]])
    e1=model.unet(zt,torch.tensor([tt]),LM[[io]],ref); e2=model.unet(zt,torch.tensor([tt]),LM[[ic]],ref)
    print('sens t',tt, (e1-e2)[:,:,4:].pow(2).mean().item(), 'eps scale', e1[:,:,4:].pow(2).mean().item())
gen=[]
t1=time.time()
for nsteps in (10,):
  with torch.no_grad():
    gen=[]
    for w in range(0,T-L+1,L):
        noise=torch.randn(CT[w:w+L].shape,generator=torch.Generator().manual_seed(w))
        zz=sample_ddim(lambda x,tt: model.unet(x,tt,model.prepare_landmarks(LM[w:w+L]),ref,num_frames=L), noise, sched, nsteps, known=CT[w:w+L], known_mask=upper_half_mask(*CT.shape[-2:]))
        gen.append(((model.decode(zz).clamp(-1,1)+1)*127.5).round().byte().permute(0,2,3,1).numpy())
  gen=np.concatenate(gen); n=len(gen); tr8=cr[:n]
  lips=z['points131_crop'][:, list(topology.LIP_POS)]*S
  x0,y0=np.floor(lips.min((0,1))-2).astype(int); x1,y1=np.ceil(lips.max((0,1))+2).astype(int)
  box=(max(x0,0),max(y0,S//2),min(x1,S),min(y1,S))
  print('steps',nsteps,'corr', np.corrcoef(mouth_area(gen,box),op[:n])[0,1], 'psnr gen', psnr(gen[:,S//2:],tr8[:,S//2:]), 'copy', psnr(np.repeat(refimg[None],n,0)[:,S//2:],tr8[:,S//2:]), 'eval', time.time()-t1)
import cv2
grid=np.concatenate([np.concatenate(list(a[:12]),1) for a in (gen,tr8)],0)
cv2.imwrite('/tmp/lt/unet.png', cv2.cvtColor(cv2.resize(grid,None,fx=4,fy=4,interpolation=cv2.INTER_NEAREST),cv2.COLOR_RGB2BGR))
