"""The frozen image encoders: a registry of loaders by `kind`, each encoder's preprocessing, and the backbone.

Kinds (the `kind` key of an encoder in a model config):

- `open_clip`: an open_clip image tower whose trunk is a timm model (BiomedCLIP). `source` is an open_clip
  hub id (`hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224`) or a local directory holding
  `open_clip_config.json` and its weights (`open_clip_pytorch_model.bin` or `.safetensors`). Only the
  `visual.trunk.*` weights are used; the text tower is never built, so no tokenizer or text model is
  fetched. `arch` is an open_clip config (`model_cfg.vision_cfg`); the key `timm_model_kwargs` (ours)
  passes widths and depths to `timm.create_model`. Output: `forward_features` (after the final norm).
- `hf_clip`: the vision half of a transformers `CLIPModel` (PubMedCLIP). `source` is a hub id or a local
  CLIPModel directory; `arch` is a `CLIPVisionConfig`. Output: `last_hidden_state` (before post-layernorm).
- `timm`: any timm model by configuration alone: `arch = {"model_name": ..., "kwargs": {...}}`, `source`
  a local directory (or `hf-hub:` repo) holding `model.safetensors` or `pytorch_model.bin` (timm's format;
  classifier `head.*` weights are ignored). Output as for `open_clip`.
- `hf`: any transformers vision model by configuration alone: `source` a hub id or local directory loaded
  with `AutoModel` (its `vision_model` is used if it has one), `arch` a config with `model_type`.
  `drop_prefix_tokens` must be given (e.g. 1 for ViT/CLIP, 0 for SigLIP).

To add another encoder, add an entry to `vision.encoders` with one of these kinds; to add a new kind,
add an `EncoderLoader` subclass to `ENCODER_LOADERS` (and, for the tiny preset, a writer to
`litegpt.model.tiny.ENCODER_WRITERS`). Every encoder yields patch tokens [B, N, C] (prefix/CLS tokens
dropped, or hidden state `layer` if set); the backbone concatenates them along the token axis, so all
encoders must share C. Encoders are frozen: no gradients, always in eval mode, in `vision.dtype`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from litegpt.files import sha256_file
from litegpt.model.config import HUB_PREFIX, ConfigError, EncoderConfig, VisionConfig, local_source, resolve_arch

INTERPOLATIONS = {
    "bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX,
}


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


class Preprocess:
    """Image -> normalised [3, S, S] float32 tensor: square resize (no crop), RGB, per-channel mean/std."""

    def __init__(self, cfg: EncoderConfig):
        if cfg.interpolation not in INTERPOLATIONS:
            raise ConfigError(f"encoder {cfg.name}: interpolation {cfg.interpolation!r} is not one of "
                              f"{', '.join(INTERPOLATIONS)}")
        self.size = cfg.image_size
        self.resample = INTERPOLATIONS[cfg.interpolation]
        self.mean = np.asarray(cfg.mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(cfg.std, dtype=np.float32).reshape(3, 1, 1)
        self.key = (cfg.image_size, cfg.interpolation, tuple(cfg.mean), tuple(cfg.std))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.mode != "L":  # grayscale (the shards) is resized once: channels resize independently
            image = image.convert("RGB")
        image = image.resize((self.size, self.size), self.resample)
        pixels = np.asarray(image, dtype=np.float32) / 255.0
        pixels = np.broadcast_to(pixels, (3, *pixels.shape)) if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        return torch.from_numpy((pixels - self.mean) / self.std)


def resolve_source(cfg: EncoderConfig) -> Path | None:
    """The local directory holding an encoder's files (a hub id is fetched into, or found in, the HF cache)."""
    if cfg.source is None:
        return None
    path = local_source(cfg.source)
    if path is not None:
        if not path.is_dir():
            raise ConfigError(f"encoder {cfg.name}: source directory {cfg.source} does not exist "
                              "(for a tiny preset, build it with `litegpt tiny-weights --config <model config>`)")
        return path
    from huggingface_hub import snapshot_download

    repo = cfg.source.removeprefix(HUB_PREFIX)
    try:
        return Path(snapshot_download(repo, allow_patterns=["*.json", "*.safetensors", "*.bin"]))
    except Exception as exc:  # offline without a cached copy, unknown repo, ...
        raise ConfigError(f"encoder {cfg.name}: cannot fetch {repo!r} from the hub ({exc}); "
                          "download it once with network access or point `source` at a local directory") from None


def _weights_in(directory: Path, preferred: tuple[str, ...]) -> Path:
    for name in preferred:
        if (directory / name).is_file():
            return directory / name
    found = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.bin"))
    if not found:
        raise ConfigError(f"{directory}: no weights file ({', '.join(preferred)})")
    return found[0]


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state)


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], where: str, ignore_prefixes=()) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(k for k in set(state) - set(expected) if not k.startswith(tuple(ignore_prefixes)))
    misshaped = sorted(f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
                       for k, v in expected.items() if k in state and state[k].shape != v.shape)
    if missing or unexpected or misshaped:
        def head(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f" (+{len(items) - 8} more)" if len(items) > 8 else "")
        raise ConfigError(f"{where}: weights do not match the architecture: "
                          + "; ".join(f"{label}: {head(items)}" for label, items in
                                      (("missing", missing), ("unexpected", unexpected), ("misshaped", misshaped))
                                      if items))
    module.load_state_dict({k: state[k] for k in expected}, strict=True)


class EncoderLoader:
    """How one kind of encoder (a model family in its on-disk format) is built, loaded, hashed and run."""

    config_file: str = "config.json"

    def architecture(self, cfg: EncoderConfig, directory: Path | None) -> dict:
        """The architecture: from the weights directory when there is one, else the config's `arch`."""
        if directory is not None and (directory / self.config_file).is_file():
            return json.loads((directory / self.config_file).read_text())
        arch = resolve_arch(cfg.arch, f"encoder {cfg.name}")
        if arch is None:
            raise ConfigError(f"encoder {cfg.name}: no weights directory and no `arch` to build it from")
        return arch

    def build(self, arch: dict) -> nn.Module:
        raise NotImplementedError

    def load(self, module: nn.Module, directory: Path, cfg: EncoderConfig) -> None:
        raise NotImplementedError

    def weight_files(self, directory: Path) -> list[Path]:
        raise NotImplementedError

    def tokens(self, module: nn.Module, pixels: torch.Tensor, cfg: EncoderConfig) -> torch.Tensor:
        raise NotImplementedError


class TimmLoader(EncoderLoader):
    """A timm model saved in timm's own format (`model.safetensors` / `pytorch_model.bin`)."""

    weights = ("model.safetensors", "pytorch_model.bin")

    def architecture(self, cfg: EncoderConfig, directory: Path | None) -> dict:
        arch = resolve_arch(cfg.arch, f"encoder {cfg.name}")
        if arch is None or "model_name" not in arch:
            raise ConfigError(f"encoder {cfg.name}: kind timm needs arch = {{model_name: ..., kwargs: {{...}}}}")
        return arch

    def build(self, arch: dict) -> nn.Module:
        import timm
        return timm.create_model(arch["model_name"], pretrained=False, num_classes=0, **arch.get("kwargs", {}))

    def load(self, module: nn.Module, directory: Path, cfg: EncoderConfig) -> None:
        path = _weights_in(directory, self.weights)
        _load_strict(module, _load_tensors(path), f"encoder {cfg.name} ({path})", ignore_prefixes=("head.",))

    def weight_files(self, directory: Path) -> list[Path]:
        return [_weights_in(directory, self.weights)]

    def tokens(self, module: nn.Module, pixels: torch.Tensor, cfg: EncoderConfig) -> torch.Tensor:
        prefix = module.num_prefix_tokens
        if cfg.drop_prefix_tokens not in (None, prefix):
            raise ConfigError(f"encoder {cfg.name}: this timm model has {prefix} prefix token(s); "
                              f"drop_prefix_tokens={cfg.drop_prefix_tokens} is not supported")
        if cfg.layer is None:
            return module.forward_features(pixels)[:, prefix:]
        (hidden,) = module.forward_intermediates(pixels, indices=[cfg.layer], intermediates_only=True,
                                                 output_fmt="NLC", norm=False)
        return hidden


class OpenClipLoader(TimmLoader):
    """An open_clip timm image tower (BiomedCLIP); weights are the checkpoint's `visual.trunk.*`."""

    config_file = "open_clip_config.json"
    prefix = "visual.trunk."
    # the weight files open_clip's `local-dir:` loading looks for, in its order of preference (open_clip has
    # no public lookup that does not also build the text tower, which would fetch BiomedCLIP's text model)
    weights = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
               "open_clip_pytorch_model.pth", "model.safetensors", "pytorch_model.bin", "pytorch_model.pth",
               "model.pth")

    def architecture(self, cfg: EncoderConfig, directory: Path | None) -> dict:
        return EncoderLoader.architecture(self, cfg, directory)

    def build(self, arch: dict) -> nn.Module:
        import timm
        vision = arch.get("model_cfg", arch)["vision_cfg"]
        if not vision.get("timm_model_name"):
            raise ConfigError("open_clip encoders must have a timm trunk (vision_cfg.timm_model_name)")
        return timm.create_model(vision["timm_model_name"], pretrained=False, num_classes=0,
                                 **vision.get("timm_model_kwargs", {}))

    def load(self, module: nn.Module, directory: Path, cfg: EncoderConfig) -> None:
        from open_clip.factory import load_state_dict
        path = _weights_in(directory, self.weights)
        state = load_state_dict(str(path))
        trunk = {k[len(self.prefix):]: v for k, v in state.items() if k.startswith(self.prefix)}
        if not trunk:
            raise ConfigError(f"encoder {cfg.name}: {path} has no `{self.prefix}*` weights")
        _load_strict(module, trunk, f"encoder {cfg.name} ({path})")

    def weight_files(self, directory: Path) -> list[Path]:
        return [directory / self.config_file, _weights_in(directory, self.weights)]


class HFLoader(EncoderLoader):
    """A transformers vision model loaded with AutoModel (its `vision_model` if it is a dual encoder)."""

    default_prefix: int | None = None

    def build(self, arch: dict) -> nn.Module:
        from transformers import AutoConfig, AutoModel
        arch = dict(arch)
        config = AutoConfig.for_model(arch.pop("model_type"), **arch)
        model = AutoModel.from_config(config, attn_implementation="sdpa")
        return getattr(model, "vision_model", model)

    def _loaded(self, directory: Path) -> nn.Module:
        from transformers import AutoModel
        model = AutoModel.from_pretrained(str(directory), attn_implementation="sdpa")
        return getattr(model, "vision_model", model)

    def load(self, module: nn.Module, directory: Path, cfg: EncoderConfig) -> None:
        from transformers.utils import logging as hf_logging
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # its report lists the unused text tower; _load_strict checks ours
        try:
            loaded = self._loaded(directory)
        finally:
            hf_logging.set_verbosity(verbosity)
        _load_strict(module, loaded.state_dict(), f"encoder {cfg.name} ({directory})")

    def weight_files(self, directory: Path) -> list[Path]:
        weights = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.bin"))
        return [directory / self.config_file, *weights]

    def tokens(self, module: nn.Module, pixels: torch.Tensor, cfg: EncoderConfig) -> torch.Tensor:
        prefix = self.default_prefix if cfg.drop_prefix_tokens is None else cfg.drop_prefix_tokens
        if prefix is None:
            raise ConfigError(f"encoder {cfg.name}: kind {cfg.kind} needs drop_prefix_tokens (e.g. 1 for a CLS token)")
        out = module(pixel_values=pixels, output_hidden_states=cfg.layer is not None)
        hidden = out.last_hidden_state if cfg.layer is None else out.hidden_states[cfg.layer]
        return hidden[:, prefix:]


class HFClipLoader(HFLoader):
    """The vision half of a transformers CLIPModel directory (or a CLIPVisionModel)."""

    default_prefix = 1

    def architecture(self, cfg: EncoderConfig, directory: Path | None) -> dict:
        arch = super().architecture(cfg, directory)
        return arch.get("vision_config", arch)  # a whole CLIPModel's config holds the vision one

    def build(self, arch: dict) -> nn.Module:
        from transformers import CLIPVisionConfig, CLIPVisionModel
        arch = {k: v for k, v in arch.items() if k != "model_type"}
        return CLIPVisionModel(CLIPVisionConfig(**arch))

    def _loaded(self, directory: Path) -> nn.Module:
        from transformers import CLIPVisionModel
        return CLIPVisionModel.from_pretrained(str(directory), attn_implementation="sdpa")


ENCODER_LOADERS: dict[str, EncoderLoader] = {"open_clip": OpenClipLoader(), "hf_clip": HFClipLoader(),
                                              "timm": TimmLoader(), "hf": HFLoader()}


def loader_of(cfg: EncoderConfig) -> EncoderLoader:
    """The loader of an encoder's `kind`."""
    try:
        return ENCODER_LOADERS[cfg.kind]
    except KeyError:
        raise ConfigError(f"encoder {cfg.name}: unknown kind {cfg.kind!r}; known: {', '.join(ENCODER_LOADERS)}") from None


def build_raw_encoder(cfg: EncoderConfig, load_weights: bool = True) -> tuple[nn.Module, dict]:
    """The encoder's module (weights loaded from `source`, or seeded random init) and its architecture.

    Built on the current default device: under `torch.device("meta")` nothing is allocated or loaded.
    """
    loader = loader_of(cfg)
    directory = resolve_source(cfg) if load_weights else None
    arch = loader.architecture(cfg, directory if directory is not None else _local_dir_if_any(cfg))
    meta = torch.empty(0).device.type == "meta"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        module = loader.build(arch)
    if directory is not None and not meta:
        loader.load(module, directory, cfg)
    return module, arch


def _local_dir_if_any(cfg: EncoderConfig) -> Path | None:
    """A local source directory, for reading the architecture only (never fetches)."""
    path = local_source(cfg.source)
    return path if path is not None and path.is_dir() else None


class FrozenEncoder(nn.Module):
    """One encoder, frozen: no gradients, permanently in eval mode, patch tokens out."""

    def __init__(self, cfg: EncoderConfig, module: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.model = module
        self.model.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> FrozenEncoder:
        return super().train(False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return loader_of(self.cfg).tokens(self.model, pixels, self.cfg)


_GEOMETRY: dict[str, tuple[int, int]] = {}


def encoder_geometry(cfg: EncoderConfig) -> tuple[int, int]:
    """(tokens, width) of an encoder's output, from a forward pass on the meta device (no weights)."""
    key = json.dumps(dataclasses.asdict(cfg), sort_keys=True) + str(_local_dir_if_any(cfg))
    if key not in _GEOMETRY:
        _GEOMETRY[key] = _meta_geometry(cfg)
    return _GEOMETRY[key]


def _meta_geometry(cfg: EncoderConfig) -> tuple[int, int]:
    with torch.device("meta"):
        module, _ = build_raw_encoder(cfg, load_weights=False)
        pixels = torch.empty(1, 3, cfg.image_size, cfg.image_size)
        try:
            out = FrozenEncoder(cfg, module)(pixels)
        except (RuntimeError, ValueError, AssertionError) as exc:
            raise ConfigError(f"encoder {cfg.name}: a {cfg.image_size}x{cfg.image_size} input does not fit "
                              f"this architecture ({exc})") from None
    return int(out.shape[1]), int(out.shape[2])


def backbone_geometry(vision: VisionConfig) -> tuple[int, int]:
    """(total tokens, width) after concatenating all encoders; refuses encoders of different widths."""
    shapes = {e.name: encoder_geometry(e) for e in vision.encoders}
    widths = {w for _, w in shapes.values()}
    if len(widths) != 1:
        raise ConfigError("vision.encoders: token widths differ ("
                          + ", ".join(f"{n}: {w}" for n, (_, w) in shapes.items())
                          + "); concatenation along the token axis needs one width")
    return sum(t for t, _ in shapes.values()), widths.pop()


class ImagePreprocessor:
    """Pixels for every encoder of a vision config; encoders with identical preprocessing share one tensor.

    Picklable and free of model weights, so data-loader workers can run it.
    """

    def __init__(self, vision: VisionConfig):
        self.preprocessors = {e.name: Preprocess(e) for e in vision.encoders}

    def __call__(self, image: Image.Image) -> dict[str, torch.Tensor]:
        done: dict[tuple, torch.Tensor] = {}
        out = {}
        for name, prep in self.preprocessors.items():
            if prep.key not in done:
                done[prep.key] = prep(image)
            out[name] = done[prep.key]
        return out


class VisualBackbone(nn.Module):
    """All encoders: per-encoder pixels in, per-encoder patch tokens (rounded to `feature_dtype`) out."""

    def __init__(self, vision: VisionConfig, load_weights: bool = True):
        super().__init__()
        self.vision = vision
        self.dtype = torch_dtype(vision.dtype)
        self.feature_dtype = torch_dtype(vision.feature_dtype)
        self.encoders = nn.ModuleDict({
            e.name: FrozenEncoder(e, build_raw_encoder(e, load_weights)[0].to(self.dtype)) for e in vision.encoders})
        self.preprocess = ImagePreprocessor(vision)

    def forward(self, pixels: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: enc(pixels[name].to(self.dtype)).to(self.feature_dtype) for name, enc in self.encoders.items()}


_DIGESTS: dict[tuple, str] = {}


def _weights_sha256(path: Path) -> str:
    """sha256 of a weight file, once per (file, size, mtime): features and training both ask for it."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = sha256_file(path)
    return _DIGESTS[key]


def weights_digest(cfg: EncoderConfig) -> dict:
    """What identifies an encoder's weights: sha256 of its files, or (arch, seed) for a random init."""
    loader = loader_of(cfg)
    directory = resolve_source(cfg)
    if directory is None:
        arch = loader.architecture(cfg, None)
        return {"random_init": {"arch": arch, "seed": cfg.seed, "torch": torch.__version__}}
    return {os.path.basename(p): _weights_sha256(p) for p in loader.weight_files(directory)}
