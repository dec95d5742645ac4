import sys, time, numpy as np
sys.path.insert(0, '/work/main')
from pathlib import Path
from talkformer_core.data import synthetic
from talkformer_core.data.preprocess import save_shard, shard_from_synthetic
t=time.time()
photo = synthetic.load_photo("astronaut")
w=Path('/tmp/lt/data')
for S in (32,48,64):
  pass
for s in (0,1):
    clip = synthetic.make_clip(photo, seed=s, duration=8.0, frame_size=96)
    for S in (32,64):
        save_shard(w/f"train{S}"/f"syn{s}.npz", shard_from_synthetic(clip, S))
print('train', time.time()-t)
clip = synthetic.make_clip(photo, seed=1000, duration=4.0, frame_size=96)
for S in (32,64):
    save_shard(w/f"test{S}"/"test.npz", shard_from_synthetic(clip, S))
np.save(w/'test_opening.npy', clip.opening)
print(time.time()-t, time.process_time())
