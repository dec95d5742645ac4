import sys, time, numpy as np, torch
sys.path.insert(0,'/work/main'); sys.path.insert(0,'/work/main/tests')
from test_train_learning import learning_config, mouth_area, psnr
from talkformer_core.train import train
from talkformer_core.face import topology
S=int(sys.argv[1]); steps=int(sys.argv[2]); lr=float(sys.argv[3]); mult=eval(sys.argv[4]); bs=int(sys.argv[5])
from talkformer_core.config import AutoencoderConfig
cfg=learning_config(); cfg.model.image_size=S
cfg.model.autoencoder=AutoencoderConfig(ch=16, ch_mult=mult, num_res_blocks=1, resolution=S)
cfg.train.autoencoder_lr=lr
torch.set_num_threads(2)
t=time.time(); c0=time.process_time()
ae=train(cfg, stage="autoencoder", data=f'/tmp/lt/data/train{S}', out=f'/tmp/lt/ae{S}_{steps}_{len(mult)}', steps=steps, batch_size=bs, device='cpu', progress=False, seed=0)
print('ae time', time.time()-t, 'cpu', time.process_time()-c0, 'l1', ae.metrics['l1'][-1])
from talkformer_core.models.checkpoint import read_checkpoint, checkpoint_config
from talkformer_core.models.autoencoder import AutoencoderKL
tens, meta = read_checkpoint(ae.checkpoint); c=checkpoint_config(meta)
m=AutoencoderKL(c.model.autoencoder); 
from talkformer_core.models.checkpoint import load_model_state
load_model_state(m, tens, 'autoencoder'); m.eval()
z=np.load(f'/tmp/lt/data/test{S}/test.npz'); cr=z['crops']
x=torch.from_numpy(cr).float().div(127.5).sub(1).permute(0,3,1,2)
with torch.no_grad(): r=m.decode(m.encode(x).mode())
r8=((r.clamp(-1,1)+1)*127.5).round().byte().permute(0,2,3,1).numpy()
op=np.load('/tmp/lt/data/test_opening.npy')
lips=z['points131_crop'][:, list(topology.LIP_POS)]*S
x0,y0=np.floor(lips.min((0,1))-2).astype(int); x1,y1=np.ceil(lips.max((0,1))+2).astype(int)
box=(max(x0,0),max(y0,S//2),min(x1,S),min(y1,S))
print('recon lower psnr', psnr(r8[:,S//2:], cr[:,S//2:]), 'corr rec', np.corrcoef(mouth_area(r8,box),op)[0,1], 'corr true', np.corrcoef(mouth_area(cr,box),op)[0,1])
