"""quantize / dequantize: the reference against brute force, ties, and errors."""

import pytest
import torch

from igpt_kernels import dequantize, quantize, reference


def _brute(pixels, palette):
    p = pixels.reshape(-1, 3).double()
    d = ((p[:, None, :] - palette.double()[None]) ** 2).sum(-1)  # (n, K)
    return d.argmin(1).reshape(pixels.shape[:-1])


@pytest.mark.parametrize("K", [1, 16, 512, 4096])
@pytest.mark.parametrize("shape", [(0, 3), (1, 3), (7, 5, 3), (2, 3, 11, 3)])
def test_reference_matches_brute_force(K, shape):
    pixels = torch.randint(0, 256, shape, dtype=torch.uint8)
    palette = torch.rand(K, 3) * 255
    tokens = quantize(pixels, palette, backend="torch")
    assert tokens.shape == shape[:-1] and tokens.dtype == torch.int64
    assert torch.equal(tokens, _brute(pixels, palette))


def test_ties_pick_lowest_index():
    palette = torch.tensor([[10.0, 10, 10], [0, 0, 0], [20, 20, 20], [0, 0, 0]])
    pixels = torch.tensor([[5, 5, 5], [15, 15, 15], [0, 0, 0]], dtype=torch.uint8)
    assert quantize(pixels, palette).tolist() == [0, 0, 1]


def test_dequantize_round_trip():
    palette = torch.rand(64, 3) * 255
    tokens = torch.randint(0, 64, (4, 9))
    rgb = dequantize(tokens, palette)
    assert rgb.dtype == torch.uint8 and rgb.shape == (4, 9, 3)
    rounded = palette.round()
    assert torch.equal(rgb, rounded.to(torch.uint8)[tokens])
    # quantizing the colours again finds a palette entry of exactly that colour
    again = quantize(rgb, rounded)
    assert torch.equal(rounded[again], rgb.float())


@pytest.mark.parametrize("fn", [quantize, reference.quantize])
@pytest.mark.parametrize(
    "pixels,palette,exc,words",
    [
        (torch.zeros(4, 3), torch.rand(8, 3), TypeError, "pixels must have dtype"),
        (torch.zeros(4, 4, dtype=torch.uint8), torch.rand(8, 3), ValueError, "pixels must be"),
        (torch.zeros(4, 3, dtype=torch.uint8), torch.rand(8, 4), ValueError, "palette must be"),
        (torch.zeros(4, 3, dtype=torch.uint8), torch.rand(8, 3).double(), TypeError, "palette"),
        (torch.zeros(4, 3, dtype=torch.uint8), torch.full((2, 3), float("nan")), ValueError, "NaN"),
        (torch.zeros(4, 3, dtype=torch.uint8), torch.rand(0, 3), ValueError, "1 <= K"),
    ],
)
def test_quantize_bad_input(fn, pixels, palette, exc, words):
    with pytest.raises(exc, match=words):
        fn(pixels, palette)


def test_dequantize_bad_input():
    palette = torch.rand(8, 3)
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, 8\)"):
        dequantize(torch.tensor([0, 8]), palette)
    with pytest.raises(TypeError, match="integer"):
        dequantize(torch.tensor([0.0]), palette)
    assert dequantize(torch.zeros(0, dtype=torch.long), palette).shape == (0, 3)


def test_compiled_backends_say_why():
    pixels = torch.zeros(2, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="cannot use backend='cpu'"):
        quantize(pixels, torch.rand(4, 3), backend="cpu")
