"""Networks from files that are not built-in state dicts: ONNX, ``torch.export`` programs, channel order.

Each source becomes a ``torch.nn.Module`` mapping the normalised (N, C, H, W) float batch a
:class:`~slidescore.model.scoring.PatchClassifier` hands it to (N, K) or (N, K, h, w) outputs, so
every source shares the one scoring path (per-patch batches, output checks, heads, calibration):

- :class:`OnnxModule` runs an ONNX file through onnxruntime (the CUDA provider when the classifier
  runs on CUDA and the provider exists, else the CPU provider). ONNX networks are scored per patch;
  a fixed batch axis is served in slices of that size (the last one padded). The session is not
  picklable: the module keeps the file's bytes and rebuilds its session when unpickled.
- :class:`ExportedModule` runs a ``torch.export`` program (``.pt2``). Before
  :func:`torch.export.load` sees the archive, :func:`check_pt2_archive` refuses any archive in which
  it would unpickle (torch 2.13 unpickles tensor subclasses, custom and opaque objects and legacy
  weight files with ``weights_only=False``, and falls back to it for sample inputs), so loading runs
  no pickled code. Also rebuilt from its bytes when unpickled.
- :class:`ChannelsLastInput` hands a torch network its input as (N, H, W, C) (card
  ``input_layout: nhwc``); :class:`OnnxModule` does so itself.

Neither ONNX nor exported programs are TorchScript or pickles: an ONNX file is a protobuf graph with
its weights, a ``.pt2`` archive JSON (graph, weight metadata) plus raw tensor bytes.
"""

from __future__ import annotations

import io
import json
import logging
import zipfile
from typing import Any

import numpy as np
import torch

from slidescore.errors import ModelLoadError

log = logging.getLogger(__name__)

ONNX_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def onnx_providers(device: str) -> tuple[str, list[str]]:
    """The classifier's device and onnxruntime providers for a requested ``device`` (auto, cpu, cuda[:N]).

    CUDA needs both a CUDA torch and onnxruntime's CUDA provider (the ``onnxruntime-gpu`` wheel);
    without them an ONNX model runs on the CPU provider, with a warning when CUDA was asked for.
    """
    import onnxruntime as ort

    has_cuda_ep = "CUDAExecutionProvider" in ort.get_available_providers()
    want_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if want_cuda and has_cuda_ep and torch.cuda.is_available():
        return (device if device != "auto" else "cuda"), ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device.startswith("cuda"):
        log.warning("model.device %s: onnxruntime has no CUDA provider here (install onnxruntime-gpu) or torch sees no "
                    "GPU; the ONNX model runs on the CPU provider", device)
    return "cpu", ["CPUExecutionProvider"]


class OnnxModule(torch.nn.Module):
    """An ONNX network behind a torch module interface (no gradients: explanations are not computed).

    Parameters
    ----------
    data
        The ONNX file's bytes (a ``ModelProto``; external data files are not supported).
    label
        The model file, for error messages.
    providers
        onnxruntime execution providers, in order of preference.
    nhwc
        Hand the network (N, H, W, C) input (card ``input_layout: nhwc``).
    """

    differentiable = False

    def __init__(self, data: bytes, *, label: str, providers: list[str], nhwc: bool = False) -> None:
        super().__init__()
        self.data, self.label, self.providers, self.nhwc = data, label, list(providers), nhwc
        self._open()

    def _open(self) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, torch.get_num_threads())  # the process's share of cores (Ray sets it)
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(self.data, sess_options=opts, providers=self.providers)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
            if "external data" in str(e).lower():
                raise ModelLoadError(
                    f"model {self.label}: its weights are in separate files (ONNX external data), which are not read; "
                    "save the model as one file (under 2 GB): python -c \"import onnx; onnx.save(onnx.load('IN.onnx'), "
                    "'OUT.onnx')\", or export with torch.onnx.export(..., external_data=False)", path=self.label) from None
            raise ModelLoadError(f"model {self.label}: onnxruntime cannot load it ({type(e).__name__}: "
                                 f"{_one_line(e)}); export it again (opset ≥ 17) or check the file",
                                 path=self.label) from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or not outputs:
            raise ModelLoadError(
                f"model {self.label}: expected an ONNX graph with one input (the image batch) and at least one output, "
                f"got inputs {[i.name for i in inputs]} and outputs {[o.name for o in outputs]}", path=self.label)
        inp = inputs[0]
        if inp.type not in ONNX_FLOAT_TYPES or len(inp.shape) != 4:
            raise ModelLoadError(f"model {self.label}: expected a 4-d float input (N, C, H, W), or (N, H, W, C) with "
                                 f"input_layout: nhwc, got {inp.name!r} of {inp.type} {inp.shape}", path=self.label)
        self.input_name, self.input_shape, self.output_name = inp.name, list(inp.shape), outputs[0].name
        self.input_dtype = ONNX_FLOAT_TYPES[inp.type]
        batch = inp.shape[0]
        self.fixed_batch = batch if isinstance(batch, int) and batch > 0 else None

    def spatial_shape(self) -> tuple[Any, Any, Any]:
        """The input's (channels, height, width) as the graph declares them (an int, or a name when dynamic)."""
        s = self.input_shape
        return (s[3], s[1], s[2]) if self.nhwc else (s[1], s[2], s[3])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.nhwc:
            x = x.permute(0, 2, 3, 1)  # NHWC memory (channels_last) makes this a view, not a copy
        arr = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy(), dtype=self.input_dtype)
        out = in_batches_of(self.fixed_batch, torch.from_numpy(arr), self._run)
        if out.ndim == 1:  # one score per patch
            out = out[:, None]
        return out.float().to(x.device)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.session.run([self.output_name], {self.input_name: x.numpy()})[0]))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("session", None)  # an InferenceSession does not pickle: rebuilt from the bytes
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._open()


class ExportedModule(torch.nn.Module):
    """A ``torch.export`` program (``.pt2``) as a module; check the archive with :func:`check_pt2_archive` first."""

    def __init__(self, data: bytes, *, label: str) -> None:
        super().__init__()
        self.data, self.label = data, label
        self._open()

    def _open(self, device: torch.device | None = None) -> None:
        try:
            program = torch.export.load(io.BytesIO(self.data))
            if device is not None and device.type != "cpu":
                # a program records the devices of its tensors and of the ops that make new ones: moving its
                # weights alone leaves those on the CPU, so the program itself is moved
                from torch.export.passes import move_to_device_pass

                program = move_to_device_pass(program, device)
            self.program = program.module()
        except Exception as e:  # deserialisation raises assorted errors for damaged or foreign archives
            raise ModelLoadError(f"model {self.label}: torch.export.load failed ({type(e).__name__}: {_one_line(e)}); "
                                 "save it again with torch.export.save from this torch version", path=self.label) from None
        self.input_shape = _program_input_shape(program)
        self.device = device or torch.device("cpu")

    def spatial_shape(self) -> tuple[Any, Any, Any]:
        """(channels, height, width) of the program's input (an int, or a symbol's name when dynamic)."""
        s = self.input_shape
        return (s[1], s[2], s[3]) if len(s) == 4 else (None, None, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = self.input_shape[0] if self.input_shape else None
        return in_batches_of(batch if isinstance(batch, int) else None, x, self.program)

    def train(self, mode: bool = True) -> ExportedModule:
        # an exported program is fixed in the mode it was exported in (GraphModule.eval() raises)
        self.training = mode
        return self

    def to(self, *args: Any, **kwargs: Any) -> ExportedModule:  # type: ignore[override]
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if device is not None and torch.device(device) != self.device:
            self._open(torch.device(device))
        return self

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_modules"] = {k: v for k, v in state["_modules"].items() if k != "program"}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._open(self.device)


class ChannelsLastInput(torch.nn.Module):
    """Hands ``inner`` its input as (N, H, W, C) (card ``input_layout: nhwc``)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.permute(0, 2, 3, 1))


def in_batches_of(n: int | None, x: torch.Tensor, run: Any) -> torch.Tensor:
    """``run(x)``, or for a network with a fixed batch ``n``: slices of ``n``, the last padded with zeros."""
    if n is None or len(x) == n:
        return run(x)
    parts = []
    for i in range(0, len(x), n):
        part = x[i : i + n]
        if len(part) < n:
            part = torch.cat([part, part.new_zeros((n - len(part), *part.shape[1:]))])
        parts.append(run(part)[: len(x) - i])
    return torch.cat(parts)


def _program_input_shape(program: Any) -> list[Any]:
    """The first user input's shape: ints, or the symbol's name for a dynamic axis."""
    names = set(program.graph_signature.user_inputs)
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in names:
            val = node.meta.get("val")
            if val is None or not hasattr(val, "shape"):
                return []
            return [int(d) if isinstance(d, int) else str(d) for d in val.shape]
    return []


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:300] + ("…" if len(text) > 300 else "")


# -- torch.export archives: no pickles --------------------------------------------------------
def check_pt2_archive(data: bytes, label: str) -> None:
    """Refuse a ``.pt2`` archive that :func:`torch.export.load` would unpickle anything from.

    torch 2.13's loader reads the graph from JSON and plain tensors as raw bytes, but unpickles
    (``weights_only=False`` or plain ``pickle``) tensor-subclass weights and constants (``use_pickle``),
    custom and opaque object constants, weights in the legacy ``<model>.pt`` files and the pre-2.8
    archive layout, and falls back to a full unpickle when the sample inputs do not load with
    ``weights_only=True``. Any of these raises :class:`~slidescore.errors.ModelLoadError`.
    """
    from torch.export.pt2_archive import constants as c

    def refuse(why: str) -> ModelLoadError:
        return ModelLoadError(f"model {label}: not loaded, because torch.export.load would unpickle {why} (pickles can "
                              "run code); export plain tensors and save with torch.export.save from torch ≥ 2.8", path=label)

    try:
        z = zipfile.ZipFile(io.BytesIO(data))
        names = z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise ModelLoadError(f"model {label}: not a torch.export archive (a .pt2 zip file): {e}", path=label) from None
    roots = {n.split("/", 1)[0] for n in names if "/" in n}
    root = next(iter(roots)) + "/" if len(roots) == 1 else ""
    rel = {n[len(root):] for n in names}
    if c.ARCHIVE_FORMAT_PATH not in rel or z.read(root + c.ARCHIVE_FORMAT_PATH).decode(errors="replace").strip() != c.ARCHIVE_FORMAT_VALUE:
        raise refuse("an archive of the pre-2.8 layout (pickled state dict)")
    models = [n for n in rel if n.startswith(c.MODELS_DIR) and n.endswith(".json")]
    if not models:
        raise ModelLoadError(f"model {label}: the archive holds no exported program ({c.MODELS_DIR}*.json)", path=label)
    for n in sorted(rel):
        if n.startswith(c.WEIGHTS_DIR) and n.endswith(".pt"):
            raise refuse(f"weights stored as a legacy pickle ({n})")
        if n.startswith(c.CONSTANTS_DIR) and n.endswith(".pt"):
            raise refuse(f"constants stored as a legacy pickle ({n})")
    for n in sorted(rel):
        if not (n.startswith((c.WEIGHTS_DIR, c.CONSTANTS_DIR)) and n.endswith("_config.json")):
            continue
        try:
            entries = json.loads(z.read(root + n))["config"]
        except (ValueError, KeyError, TypeError) as e:
            raise ModelLoadError(f"model {label}: {n} in the archive cannot be read ({e})", path=label) from None
        for fqn, meta in entries.items():
            path_name = str(meta.get("path_name", ""))
            if meta.get("use_pickle"):
                raise refuse(f"tensor {fqn!r} (a tensor subclass)")
            if n.startswith(c.CONSTANTS_DIR) and not path_name.startswith(c.TENSOR_CONSTANT_FILENAME_PREFIX):
                raise refuse(f"constant {fqn!r} (a custom or opaque object)")
    for n in sorted(rel):
        if n.startswith(c.SAMPLE_INPUTS_DIR):
            try:  # the restricted unpickler: tensors and containers only, no code
                torch.load(io.BytesIO(z.read(root + n)), weights_only=True)
            except Exception as e:  # an UnpicklingError names the refused global
                raise refuse(f"sample inputs that the safe loader refuses ({type(e).__name__}: {_one_line(e)[:120]})") from None
