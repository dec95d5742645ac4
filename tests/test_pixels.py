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


def test_to_pixels_of_a_tensor_is_exactly_the_documented_formula_for_every_float_dtype():
    """clamp, (x + 1) * 127.5 in float32, round half to even, uint8: also for the bf16 / fp16
    tensors of autocast (training previews, decoded samples), values out of range included."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(4096, generator=g) * 1.5, torch.arange(257) / 128.0 - 1.0,
                   torch.arange(256) / 127.5 - 1.0 + 0.5 / 127.5, torch.tensor([float("inf"), -float("inf")])])
    for dt in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        t = x.to(dt)
        assert torch.equal(to_pixels(t), ((t.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)), dt
