"""torchvision transforms of the re-id literature, for PIL frames.

Training (most re-id code since Zheng et al.): resize to ``height x width``, random horizontal
flip, zero-pad then random crop back to size, to tensor, normalise with the ImageNet statistics,
random erasing (Zhong et al. 2020; the erased box takes value 0, the mean colour after
normalisation). Each part can be switched off: DAL, UTAL, UGA and EEA state no flip, crop or
erasing (UTAL, UGA and EEA: "resized to 256 x 128"), so their ``paper`` presets resize only;
TSSL states "horizontal flip, crop" for its originals. Testing: resize, to tensor, normalise.
Both map a PIL image to a float32 tensor [3, height, width]. torchvision is imported when a
transform is built, so the rest of :mod:`fastassoc.data` works without it.
"""
from __future__ import annotations

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _size(height: int, width: int) -> tuple[int, int]:
    if not all(isinstance(v, int) and v >= 1 for v in (height, width)):
        raise ValueError(f"height and width must be integers >= 1, got {height!r}, {width!r}")
    return height, width


def train_transform(height: int, width: int, *, flip: float = 0.5, pad: int | None = None, erasing: float = 0.5,
                    mean: tuple[float, float, float] = IMAGENET_MEAN, std: tuple[float, float, float] = IMAGENET_STD):
    """Training transform: resize, flip, pad-crop, normalise, random erasing.

    Parameters
    ----------
    height, width : int
        Output size (256 x 128 in the papers; 64 x 32 or 128 x 64 for the synthetic world).
    flip : float
        Probability of a horizontal flip.
    pad : int, optional
        Zero padding before the random crop; default ``round(height / 25.6)`` (10 at 256).
        0 disables the pad-crop.
    erasing : float
        Probability of random erasing; 0 disables it.
    mean, std : 3 floats
        Normalisation (ImageNet by default).

    Returns
    -------
    torchvision.transforms.Compose
        PIL image -> Tensor [3, height, width], float32.
    """
    from torchvision import transforms as T

    size = _size(height, width)
    pad = round(height / 25.6) if pad is None else pad
    steps = [T.Resize(size), T.RandomHorizontalFlip(flip)]
    if pad > 0:
        steps += [T.Pad(pad), T.RandomCrop(size)]
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    if erasing > 0:
        steps.append(T.RandomErasing(p=erasing, value=0))
    return T.Compose(steps)


def eval_transform(height: int, width: int, *, mean: tuple[float, float, float] = IMAGENET_MEAN,
                   std: tuple[float, float, float] = IMAGENET_STD):
    """Evaluation transform: resize, to tensor, normalise. PIL image -> Tensor [3, height, width], float32."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(_size(height, width)), T.ToTensor(), T.Normalize(mean, std)])


def config_train_transform(config):
    """The training transform a trainer config asks for.

    Reads ``image_size``, ``train_flip`` (flip probability, default 0.5), ``train_pad``
    (pad-crop padding, default ``round(height / 25.6)``, 0: none), ``train_erasing``,
    ``train_colour_jitter`` (brightness, contrast, saturation +- it, hue +- a quarter of it,
    before the rest) and ``train_grayscale`` from ``config``; a missing field takes its default.

    Returns
    -------
    callable
        PIL image -> Tensor [3, height, width], float32.
    """
    from torchvision import transforms as T

    height, width = config.image_size
    transform = train_transform(height, width, flip=getattr(config, "train_flip", 0.5),
                                pad=getattr(config, "train_pad", None), erasing=getattr(config, "train_erasing", 0.5))
    colour = []
    jitter = getattr(config, "train_colour_jitter", 0.0)
    if jitter > 0:
        colour.append(T.ColorJitter(jitter, jitter, jitter, min(jitter / 4, 0.5)))
    grayscale = getattr(config, "train_grayscale", 0.0)
    if grayscale > 0:
        colour.append(T.RandomGrayscale(grayscale))
    return T.Compose([*colour, transform]) if colour else transform
