"""pixels.py: the one uint8 <-> [-1, 1] pair and the masked face, on numpy arrays and torch tensors alike."""
import numpy as np
import torch

from talkformer_core.pixels import mask_lower_face, to_pixels, to_signed


def test_round_trip_and_range():
    a = np.arange(256, dtype=np.uint8).reshape(16, 16)
    s = to_signed(a)
    assert s.dtype == np.float32 and s.min() == -1.0 and s.max() == 1.0
    assert np.array_equal(to_pixels(s), a)
    t = to_signed(torch.from_numpy(a))
    assert t.dtype == torch.float32 and np.allclose(t.numpy(), s)
    assert torch.equal(to_pixels(t), torch.from_numpy(a))
    assert to_signed(torch.from_numpy(a), torch.float64).dtype == torch.float64
    # out of range values clamp; as_uint8=False keeps unrounded floats
    assert np.array_equal(to_pixels(np.array([-3.0, 3.0])), [0, 255])
    assert np.allclose(to_pixels(np.array([0.001]), as_uint8=False), 127.5 * 1.001)


def test_mask_lower_face_is_a_copy_with_rows_from_half_black():
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    m = mask_lower_face(x)
    assert torch.equal(m[:, :, :4], x[:, :, :4]) and (m[:, :, 4:] == -1).all()
    assert not (x[:, :, 4:] == -1).all()  # the input is untouched
    n = mask_lower_face(x.numpy())
    assert isinstance(n, np.ndarray) and np.array_equal(n, m.numpy())
