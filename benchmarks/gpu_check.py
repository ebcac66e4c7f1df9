"""The GPU check's measurements (benchmarks/gpu_check.sh runs them there, or here with
``--dry-run``; what travels is benchmarks/gpu_carry.py's).

doctor; a ~0.76B-parameter Llama of random weights made there and quantized to Q8_0 by
localmed; plan at full and half offload; decode tokens/s at full offload, half and on the CPU,
against the memory-bandwidth bound (weight bytes read per token ÷ the measured device copy
bandwidth); the ``gpu``-marked tests; ``localmed serve`` streaming at full offload; GPTQ on CUDA
where GPTQModel imports. One report, ``report.txt`` and ``report.json``, in ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]



# --- checks (there) -------------------------------------------------------------------------------

class Report:
    def __init__(self, out: Path, dry_run: bool) -> None:
        self.out, self.dry_run = out, dry_run
        self.steps: list[dict[str, Any]] = []
        self.started = time.time()

    def step(self, name: str, work: Callable[[], dict[str, Any]], *,
             needs_gpu: bool = False) -> dict[str, Any]:
        if needs_gpu and self.dry_run:
            record = {"name": name, "status": "skipped", "why": "needs the GPU (dry run)"}
        else:
            start = time.perf_counter()
            try:
                record = {"name": name, "status": "ok", **work()}
            except Exception as exc:
                record = {"name": name, "status": "failed", "error": f"{type(exc).__name__}: "
                          f"{exc}", "traceback": traceback.format_exc(limit=4)}
            record["seconds"] = round(time.perf_counter() - start, 2)
        self.steps.append(record)
        print(f"[{record['status']}] {name}", flush=True)
        self.write()
        return record

    def write(self) -> None:
        data = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "dry_run": self.dry_run,
                "steps": self.steps}
        (self.out / "report.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
        lines = [f"localmed GPU check, {data['date']}" + (" (dry run: no GPU)" if self.dry_run
                                                            else "")]
        for s in self.steps:
            lines.append(f"\n## {s['name']}: {s['status']}"
                         + (f" ({s['seconds']} s)" if "seconds" in s else ""))
            for key, value in s.items():
                if key not in ("name", "status", "seconds", "traceback"):
                    text = value if isinstance(value, str) else json.dumps(value, default=str)
                    lines.append(f"{key}: {text}")
        (self.out / "report.txt").write_text("\n".join(lines) + "\n")


OUTSIDE = Path(tempfile.gettempdir())
"""Where localmed runs from: ``python -m localmed`` in the repository's root would import its
``localmed/`` source folder (which lacks ``localmed.quantize``, mapped from ``quantize/`` only
when installed) instead of the wheel installed for the check."""


def _localmed(*args: str, timeout: float = 300) -> str:
    done = subprocess.run([sys.executable, "-m", "localmed", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=OUTSIDE)
    allowed = (0, 1) if args[0] == "plan" else (0,)  # plan exits 1 when the model does not fit
    if done.returncode not in allowed:
        raise RuntimeError(f"localmed {' '.join(args)}: exit {done.returncode}: "
                           f"{done.stderr.strip()[-800:]}")
    return (done.stdout + done.stderr).strip()


def engine_info() -> dict[str, Any]:
    import llama_cpp

    from localmed.runtimes.hardware import llama_build

    # a GPU of this machine's (llama_supports_gpu_offload() is true wherever RPC is built in)
    return {"python": platform.python_version(), "cpus": os.cpu_count(),
            "llama_cpp_python": llama_cpp.__version__, "gpu_offload": llama_build().offload}


def torch_info() -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        return {"torch": None}
    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.mem_get_info()[1] / 2**30, 1)
    return info


def both_in_one_process() -> dict[str, Any]:
    """llama.cpp's CUDA build and torch's CUDA in one interpreter, llama.cpp first (as a
    process that loads a GGUF and then a transformers model would)."""
    return {**engine_info(), **torch_info()}


def demo_model_path() -> Path:
    from localmed.demo import demo_model

    return demo_model()


def make_models(work: str, dry_run: bool) -> dict[str, Any]:
    """The demo model (shipped, trained: confident next tokens, for CPU/GPU token equality) and a Llama of
    random weights big enough to measure memory bandwidth (~0.76B parameters; small in a dry
    run), quantized to Q8_0 by ``localmed quantize``."""
    from serve_load import random_llama  # beside this script

    from localmed.demo import demo_model

    work = Path(work)
    demo = demo_model()
    size = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2) if dry_run else \
        dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
             num_attention_heads=16, num_key_value_heads=8)
    folder = work / "checkpoint"
    parameters = random_llama(folder, max_position_embeddings=2048, **size)
    _localmed("quantize", str(folder), "--quant", "Q8_0", "--name", "gpu-check", "--out",
              str(work / "models"), timeout=600)
    shutil.rmtree(folder)
    model = work / "models" / "gpu-check.Q8_0.gguf"
    return {"demo": str(demo), "model": str(model), "model_bytes": model.stat().st_size,
            "parameters": parameters, "layers": size["num_hidden_layers"]}


def decode_tps(model: str, gpu_layers: int, tokens: int) -> float:
    """Greedy decode speed, first token to last, prefill excluded (llama-cpp-python's Llama)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=model, n_gpu_layers=gpu_layers, n_ctx=1024,
                          n_threads=os.cpu_count(), verbose=False)
    try:
        prompt = llm.tokenize(b"The patient presented with")
        count, first = 0, 0.0
        for _ in llm.generate(prompt, temp=0.0, reset=True):
            count += 1
            if count == 1:
                first = time.perf_counter()
            if count == tokens:
                break
        return (count - 1) / (time.perf_counter() - first)
    finally:
        llm.close()
        del llm
        gc.collect()


def weight_bytes_per_token(model: Path) -> int:
    """What decoding one token reads: every tensor but the token embedding (one row of it)."""
    from localmed.formats.gguf_header import read_header

    return sum(t.n_bytes for t in read_header(model).tensors if not t.name.startswith("token_embd"))


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read plus written per second (the roof for decoding)."""
    import torch

    n = 2 * 2**30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n * 10 / seconds


def serve_stream(model: Path, gpu_layers: int, tokens: int, streams: int = 1
                 ) -> dict[str, Any]:
    """``streams`` clients at once against ``serve --parallel streams``, measured by
    benchmarks/serve_load.py's client: tokens/s over all (the first token included: on the
    H200, 128 tokens took 0.31 s, 0.14 s of it before the first), time to first token, and
    each stream's decode rate from first token to last (what the raw decode step compares
    with)."""
    from serve_load import free_port, load, running  # beside this script

    port = free_port()
    command = [sys.executable, "-m", "localmed", "serve", str(model), "--port", str(port),
               "--gpu-layers", str(gpu_layers), "--parallel", str(streams)]
    with running(command, port, cwd=OUTSIDE) as url:
        measured = load(url, streams, tokens)  # raises unless every stream gave ``tokens``
    return {"streams": streams, "tokens": streams * tokens,
            **{key: round(value, 3) for key, value in measured.items()}}


def gpu_tests(models: dict[str, Any]) -> dict[str, Any]:
    """tests/test_gpu.py, from a copy of tests/ beside pyproject.toml in a folder of its own:
    run in the repository, pytest puts its root first on sys.path, and its ``localmed/``
    source folder (no ``localmed.quantize``, which the installed wheel maps from
    ``quantize/``) would stand in for the installed localmed."""
    env = {**os.environ, "LOCALMED_GPU_TEST_GGUF": models["model"]}
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(ROOT / "tests", Path(tmp) / "tests",
                        ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(ROOT / "pyproject.toml", tmp)
        done = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q",
                               "-p", "no:cacheprovider", "tests/test_gpu.py"], cwd=tmp,
                              env=env, capture_output=True, text=True, timeout=400)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-400:]
    if done.returncode != 0:
        raise RuntimeError(f"pytest exit {done.returncode}: {summary}\n{done.stdout[-3000:]}")
    return {"summary": summary}


def gptq_on_cuda() -> dict[str, Any]:
    """The transformers Runtime on CUDA needs GPTQModel's kernels."""
    try:
        import gptqmodel  # noqa: F401
    except ImportError:
        return {"status": "skipped", "why": "GPTQModel is not installed there, and cannot be "
                "carried: PyPI has no binary wheel of GPTQModel 7.6.0 for Python 3.12, and its "
                "source build compiles CUDA kernels and fetches its dependencies"}
    raise RuntimeError("GPTQModel imports there: add the GPTQ check (a tiny GPTQ checkpoint "
                       "through localmed.runtimes.hf on CUDA)")


def flash_attention(model: str) -> dict[str, Any]:
    """benchmarks/flash_attention.py at full offload: serve's engine with flash attention off
    and automatic (the plan turns it on where layers are on a GPU: is that right here?)."""
    from flash_attention import compare  # beside this script

    return compare(Path(model), 1, 128, os.cpu_count() or 1, 2, gpu_layers=-1)


def vision(folder: str, gpu_layers: int) -> dict[str, Any]:
    """The tiny Gemma 3 image-text model (benchmarks/gpu_carry.py made it) on serve's engine,
    one greedy reply per picture: its tokens, the first token's top-20 log probabilities and
    the prompt's time (the image's encoding included)."""
    from localmed.formats.gguf import read_gguf_info
    from localmed.images import prompt_parts, read_image_file
    from localmed.runtimes.base import GenerationParams
    from localmed.runtimes.batch import BatchEngine
    from localmed.runtimes.messages import Request
    from localmed.templates import Message, gguf_template

    where = Path(folder)
    made = json.loads((where / "pictures.json").read_text())
    model = where / made["model"]
    info = read_gguf_info(model)
    template = gguf_template(info.chat_template, bos_token=info.bos_token,
                             eos_token=info.eos_token, add_bos=info.add_bos)
    prompt = template.render([Message("user", "<image>Describe the image.")])
    engine = BatchEngine(model, n_parallel=1, n_ctx=1024, gpu_layers=gpu_layers,
                         threads=os.cpu_count(), flash_attention=True,
                         projector=where / made["projector"])
    params = GenerationParams(max_tokens=16, temperature=0, repeat_penalty=1.0)
    replies: dict[str, Any] = {}
    try:
        for n, name in enumerate(made["pictures"]):
            image = read_image_file(where / name)
            got = engine.run(Request(n, engine.tokenize(prompt_parts(prompt, {"<image>": image})),
                                     params, images=(image,), logprobs=20))[n]
            if got.error is not None:
                raise RuntimeError(f"{name}: {got.error}")
            replies[name] = {"tokens": got.stats.token_ids,
                             "top_logprobs": [x.logprob for x in got.logprobs[0].top],
                             "prompt_seconds": round(got.stats.prefill_seconds, 4)}
    finally:
        engine.close()
    return replies


def engine_load(model: str, gpu_layers: int, imports: list[str], quiet: bool,
                backend_init: bool = False, llama: bool = False) -> dict[str, Any]:
    """The model loaded and a context made with the llama.cpp calls serve's engine makes, after
    importing ``imports`` (one process each: which import, if any, breaks llama.cpp there);
    ``backend_init``: llama_backend_init() first, as llama_cpp.Llama calls it; ``llama``:
    through llama_cpp.Llama with its log shown (the decode step's, which worked, hid it)."""
    import importlib

    for name in imports:
        importlib.import_module(name)
    import llama_cpp

    if llama:
        llama_cpp.Llama(model_path=model, n_gpu_layers=gpu_layers, verbose=True).close()
        return {"context": True}
    if backend_init:
        llama_cpp.llama_backend_init()
    if quiet:
        global _QUIET  # the callback must outlive the call
        _QUIET = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
        llama_cpp.llama_log_set(_QUIET, None)
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = gpu_layers
    loaded = llama_cpp.llama_model_load_from_file(model.encode(), params)
    if not loaded:
        raise RuntimeError("llama.cpp could not load it")
    context = llama_cpp.llama_init_from_model(loaded, llama_cpp.llama_context_default_params())
    ok = bool(context)
    if context:
        llama_cpp.llama_free(context)
    llama_cpp.llama_model_free(loaded)
    return {"context": ok}


_QUIET: Any = None

LOAD_VARIANTS: dict[str, dict[str, Any]] = {
    "nothing else": {"imports": [], "quiet": False},
    "nothing else, llama.cpp's log silenced": {"imports": [], "quiet": True},
    "nothing else, llama_backend_init() first": {"imports": [], "quiet": False,
                                                 "backend_init": True},
    "nothing else, through llama_cpp.Llama, its log shown": {"imports": [], "quiet": False,
                                                             "llama": True},
    "sentencepiece (gguf imports it)": {"imports": ["sentencepiece"], "quiet": False},
    "Pillow": {"imports": ["PIL.Image"], "quiet": False},
    "gguf": {"imports": ["gguf"], "quiet": False},
    "localmed's engine": {"imports": ["localmed.runtimes.batch"], "quiet": False},
    "localmed's engine, log silenced": {"imports": ["localmed.runtimes.batch"], "quiet": True},
    "llama_cpp first, then localmed's engine": {"imports": ["llama_cpp",
                                                            "localmed.runtimes.batch"],
                                                "quiet": False},
}


def load_bisect(model: Path, gpu_layers: int) -> dict[str, Any]:
    """serve's engine died in llama.cpp's model loader on the first GPU run (2026-12-04) where
    llama_cpp.Llama, in a process that imported nothing else, loaded the same file: each
    variant in a process of its own, and the first that dies once more under cuda-gdb."""
    out: dict[str, Any] = {}
    for label, variant in LOAD_VARIANTS.items():
        first = all(v == "ok" for v in out.values())
        try:
            isolated("engine_load", 120, backtrace=first, model=str(model),
                     gpu_layers=gpu_layers, **variant)()
            out[label] = "ok"
        except Exception as exc:  # each variant's outcome is the result
            out[label] = str(exc)[:300]
    return out


STEPS: dict[str, Callable[..., Any]] = {
    "engine": engine_info, "torch": torch_info, "both": both_in_one_process,
    "models": make_models, "decode": decode_tps, "bandwidth": copy_bandwidth,
    "flash": flash_attention, "vision": vision, "engine_load": engine_load,
}
"""What runs in a child process of its own: whatever imports llama.cpp's CUDA build or torch.
A native crash there (an abort, a segfault, two CUDA runtimes at odds) fails that step alone
and the report goes on."""


def isolated(step: str, timeout: float = 600, backtrace: bool = True,
             **kwargs: Any) -> Callable[[], Any]:
    def work() -> Any:
        with tempfile.NamedTemporaryFile(suffix=".json") as result:
            argv = [sys.executable, __file__, "--step", step, "--kwargs", json.dumps(kwargs),
                    "--result", result.name]
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
            if done.returncode != 0:
                how = (f"signal {-done.returncode}" if done.returncode < 0
                       else f"exit {done.returncode}")
                tail = (done.stderr.strip() or done.stdout.strip())[-1500:]
                where = native_backtrace(argv, step) if done.returncode < 0 and backtrace else ""
                raise RuntimeError(f"{step} step died ({how}): {tail}{where}")
            return json.loads(Path(result.name).read_text())
    return work


_TRACED = 0
"""Backtraces taken so far (two at most: each costs a minute or more of the device's time)."""

BACKTRACES = Path(tempfile.gettempdir())
"""Where :func:`native_backtrace` writes (``checks`` points it at the report's folder)."""


def native_backtrace(argv: list[str], step: str) -> str:
    """The step once more under cuda-gdb (the GPU machine has no gdb), for the native stack
    of the crash and the shared libraries loaded: the whole in backtrace-STEP.txt, the
    crashing thread's first frames in the report. Two at most in a run."""
    global _TRACED
    debugger = shutil.which("cuda-gdb") or shutil.which("gdb")
    if debugger is None or _TRACED >= 2:
        return ""
    _TRACED += 1
    try:
        done = subprocess.run([debugger, "-q", "-batch", "-ex", "set pagination off",
                               "-ex", "run", "-ex", "bt 30", "-ex", "info sharedlibrary",
                               "-ex", "thread apply all bt 8", "--args", *argv],
                              capture_output=True, text=True, timeout=150,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return "\n(cuda-gdb ran out of time)"
    text = done.stdout + done.stderr
    (BACKTRACES / f"backtrace-{step}.txt").write_text(text)
    frames = [line for line in text.splitlines() if line.startswith("#")][:14]
    return "\nnative stack:\n" + "\n".join(line[:220] for line in frames)


def run_step(step: str, kwargs: str, result: Path) -> int:
    value = STEPS[step](**json.loads(kwargs))
    result.write_text(json.dumps(value))
    return 0


IMAGE_TOLERANCE = 0.1
"""Nats by which the first reply token's top-20 log probabilities may differ between the GPU
and the CPU: the projector's F16 matrices and the model's Q8_0 ones are summed otherwise there
(0.054 on the H200, 2026-12-04, where the greedy replies then parted on a random model's
near-ties; tests/test_gpu.py checks greedy agreement on a trained model)."""


def images_on_gpu(folder: Path) -> dict[str, Any]:
    """The image step at full offload (the projector on the GPU too; on a CPU build, the CPU
    again) against the CPU: the first reply token's log probabilities within
    :data:`IMAGE_TOLERANCE`, the two pictures' replies differ, and where the GPU's greedy
    reply parts from the CPU's (reported)."""
    gpu = isolated("vision", 300, folder=str(folder), gpu_layers=-1)()
    cpu = isolated("vision", 300, folder=str(folder), gpu_layers=0)()
    names = sorted(gpu)
    drift = max(abs(a - b) for n in names
                for a, b in zip(gpu[n]["top_logprobs"], cpu[n]["top_logprobs"], strict=True))
    parted = {n: next((i for i, (a, b) in enumerate(zip(gpu[n]["tokens"], cpu[n]["tokens"],
                                                         strict=False)) if a != b), None)
              for n in names}
    result = {"max_logprob_difference": round(drift, 6), "replies_part_at_token": parted,
              "pictures_differ": gpu[names[0]]["tokens"] != gpu[names[1]]["tokens"],
              "prompt_seconds_gpu": {n: gpu[n]["prompt_seconds"] for n in names},
              "prompt_seconds_cpu": {n: cpu[n]["prompt_seconds"] for n in names}}
    if not (drift < IMAGE_TOLERANCE and result["pictures_differ"]):
        raise RuntimeError(f"the GPU's image replies are not the CPU's: {result}")
    return result


def checks(out: Path, dry_run: bool, carry: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    report = Report(out, dry_run)
    global BACKTRACES
    BACKTRACES = out
    work = Path(tempfile.mkdtemp(prefix="localmed-gpu-check-"))
    os.environ["LOCALMED_DATA_DIR"] = str(work / "data")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokens = 32 if dry_run else 128
    try:
        env = report.step("environment: llama.cpp", isolated("engine", 120))
        report.step("serve's engine loads the demo model, import by import"
                    + (" (CPU: dry run)" if dry_run else ", full offload"),
                    lambda: load_bisect(demo_model_path(), 0 if dry_run else -1))
        report.step("environment: torch", isolated("torch", 120))
        report.step("llama.cpp and torch in one process", isolated("both", 120))
        report.step("localmed doctor", lambda: {"output": _localmed("doctor")})
        made = report.step("models", isolated("models", 900, work=str(work), dry_run=dry_run))
        if made["status"] != "ok":
            return 1
        model, layers = Path(made["model"]), made["layers"]
        half = layers // 2
        report.step("localmed plan (full offload)", lambda: {"output": _localmed("plan",
                                                                                 str(model))})
        report.step(f"localmed plan (--gpu-layers {half})",
                    lambda: {"output": _localmed("plan", str(model), "--gpu-layers", str(half))})
        speeds: dict[str, float] = {}

        def decode(label: str, n: int) -> dict[str, Any]:
            speeds[label] = isolated("decode", 300, model=str(model), gpu_layers=n,
                                     tokens=tokens)()
            return {"tokens": tokens, "tok_per_s": round(speeds[label], 1)}

        report.step("decode, full offload", lambda: decode("full", -1), needs_gpu=True)
        report.step(f"decode, {half} of {layers} layers", lambda: decode("half", half),
                    needs_gpu=True)
        report.step("decode, CPU", lambda: decode("cpu", 0))

        def bound() -> dict[str, Any]:
            bandwidth = isolated("bandwidth", 120)()
            per_token = weight_bytes_per_token(model)
            roof = bandwidth / per_token
            return {"copy_bandwidth_gb_s": round(bandwidth / 1e9, 1),
                    "weight_bytes_per_token": per_token, "bound_tok_per_s": round(roof, 1),
                    "full_offload_of_bound": round(speeds["full"] / roof, 3)
                    if "full" in speeds else None}

        report.step("memory-bandwidth bound", bound, needs_gpu=True)
        report.step("flash attention off and auto, full offload",
                    isolated("flash", 300, model=str(model)), needs_gpu=True)
        report.step("gpu-marked tests", lambda: gpu_tests(made))
        report.step("localmed serve, streaming" + ("" if dry_run else ", full offload"),
                    lambda: serve_stream(model, 0 if dry_run else -1, tokens))
        report.step("localmed serve, 4 streams at once" + ("" if dry_run else ", full offload"),
                    lambda: serve_stream(model, 0 if dry_run else -1, tokens, 4))
        report.step("an image (tiny Gemma 3 and its projector), "
                    + ("CPU against CPU (dry run)" if dry_run else "GPU against CPU"),
                    lambda: images_on_gpu(carry / "vision"))
        report.step("GPTQ runtime on CUDA", gptq_on_cuda, needs_gpu=True)
        failed = [s["name"] for s in report.steps if s["status"] == "failed"]
        if not dry_run and not env.get("gpu_offload"):
            failed.append("llama.cpp was not built with CUDA")
        print(f"report: {out / 'report.txt'}" + (f"; failed: {', '.join(failed)}"
                                                 if failed else ""))
        return 1 if failed and dry_run else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--carry", type=Path, default=ROOT / ".gpu",
                        help="what benchmarks/gpu_carry.py prepared (the image step's model)")
    parser.add_argument("--step", choices=sorted(STEPS), help=argparse.SUPPRESS)
    parser.add_argument("--kwargs", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        return run_step(args.step, args.kwargs, args.result)
    if args.out is None:
        parser.error("--out is required")
    return checks(args.out, args.dry_run, args.carry.resolve())


if __name__ == "__main__":
    sys.exit(main())
