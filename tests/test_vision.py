"""MedGemma's eyes: an image-text model converted with its vision projector, and images through
the engine chat and serve share.

The model is a tiny Gemma 3 image-text checkpoint made with transformers
(``Gemma3ForConditionalGeneration``: a two-layer SigLIP tower on 64 x 64 images, Gemma 3's
pooling projector), converted by ``localmed quantize`` (llama.cpp's converter, model and
``--mmproj``). Its replies are checked against things localmed did not write: greedy tokens
against ``llama-mtmd-cli`` built from the same pinned llama.cpp, log probabilities against
transformers on the same image and tokens, and the server through the official ``openai``
client.
"""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest

from localmed.errors import ImageError, ProjectorError
from localmed.images import MAX_PIXELS, prompt_parts, read_data_url, read_image, read_image_file
from localmed.runtimes.base import GenerationParams
from localmed.runtimes.messages import Request
from localmed.runtimes.vision import placeholder
from localmed.templates import Message, gguf_template
from tests.terminal import Terminal
from tests.test_serve import Server, free_port
from tests.tiny_models import build_gemma3_vision_model, seeded_pictures

GREEDY = GenerationParams(max_tokens=16, temperature=0, repeat_penalty=1.0)
QUESTION = "Describe the image."


def png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def data_url(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> dict[str, Path]:
    """Two seeded 64 x 64 pictures (the model's own size: no resizing on either side)."""
    return seeded_pictures(tmp_path_factory.mktemp("pictures"))


@pytest.fixture(scope="module")
def vlm(tmp_path_factory) -> dict[str, Path]:
    """The tiny image-text checkpoint, converted by localmed: F32 and Q8_0, and its projector."""
    from localmed.quantize.pipeline import resolve_source, run_quantize
    from localmed.quants import parse_quant_list
    from localmed.registry import Registry

    root = tmp_path_factory.mktemp("vlm")
    folder = build_gemma3_vision_model(root / "tiny-gemma3-vision")
    outputs = run_quantize(resolve_source(str(folder), Registry.load()),
                           parse_quant_list("F32,Q8_0"), root / "models")
    return {"checkpoint": folder, **{o.quant: o.path for o in outputs}}


def engine(model: Path, **options):
    """The engine as chat and serve load it on a CPU (flash attention on, as llama.cpp's
    tools have it by default)."""
    from localmed.runtimes.batch import BatchEngine

    return BatchEngine(model, n_parallel=options.pop("n_parallel", 1), n_ctx=1024, threads=2,
                       flash_attention=options.pop("flash_attention", True), **options)


def prompt_tokens(engine_, model: Path, image, question: str = QUESTION) -> list[int]:
    """The chat template's prompt with the image before the question, as chat sends it."""
    from localmed.formats.gguf import read_gguf_info

    info = read_gguf_info(model)
    template = gguf_template(info.chat_template, bos_token=info.bos_token,
                             eos_token=info.eos_token, add_bos=info.add_bos)
    marker = "<image>"
    text = template.render([Message("user", marker + question)])
    return engine_.tokenize(prompt_parts(text, {marker: image}))


# --- conversion -----------------------------------------------------------------------------------

def test_quantize_writes_the_projector_beside_the_model_with_provenance(vlm):
    from localmed import library
    from localmed.projector import pair

    projector = vlm["mmproj-F16"]
    assert projector == library.projector_path(vlm["F32"].name.split(".")[0], "F16",
                                               projector.parent)
    record = json.loads(library.manifest_path(projector).read_text())
    assert record["gguf_architecture"] == "clip"
    assert record["converter"].startswith("llama.cpp's convert_hf_to_gguf.py")
    assert "preprocessor_config.json" in record["inputs_sha256"]
    for quant in ("F32", "Q8_0"):
        model = json.loads(library.manifest_path(vlm[quant]).read_text())
        assert model["projector"] == {"file": projector.name, "bytes": record["bytes"],
                                      "sha256": record["sha256"], "quant": "F16"}
        assert model["inputs_sha256"] == record["inputs_sha256"]
        pairing = pair(vlm[quant])
        assert pairing.projector is not None and pairing.projector.path == projector
        assert pairing.projector.projector_type == "gemma3"
    # a projector is never listed as a model of its own
    assert library.local_quants(vlm["F32"].name.split(".")[0], projector.parent) == \
        ["F32", "Q8_0"]


# --- the engine against llama.cpp's own tool and transformers -------------------------------------

@pytest.fixture(scope="module")
def mtmd_cli() -> Path:
    """llama.cpp's llama-mtmd-cli, built once from the pinned source archive with
    scripts/install.sh's options (cached beside llama-server, as the benchmarks build it)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.serve_load import llama_tool

    return llama_tool("llama-mtmd-cli")


@pytest.mark.parametrize("quant", ["F32", "Q8_0"])
def test_greedy_reply_equals_llama_mtmd_cli(quant, vlm, pictures, mtmd_cli):
    from localmed.images import read_image_file

    model, projector = vlm[quant], vlm["mmproj-F16"]
    replies = {}
    e = engine(model, projector=projector)
    try:
        for name, path in pictures.items():
            image = read_image_file(path)
            tokens = prompt_tokens(e, model, image)
            replies[name] = e.run(Request(1, tokens, GREEDY, images=(image,)))[1].text
    finally:
        e.close()
    assert replies["a"] != replies["b"]  # the picture, not the question alone, drives it
    for name, path in pictures.items():
        cli = subprocess.run(
            [str(mtmd_cli), "-m", str(model), "--mmproj", str(projector), "--image", str(path),
             "-p", QUESTION, "-n", "16", "--temp", "0", "-c", "1024", "-t", "2"],
            env={**os.environ, "LD_LIBRARY_PATH": str(mtmd_cli.parent)},
            capture_output=True, text=True, timeout=300)
        assert cli.returncode == 0, cli.stderr[-2000:]
        # the tool frames its reply with a newline before and after
        assert cli.stdout.strip("\n") == replies[name], (cli.stdout, replies[name])


def test_log_probabilities_equal_transformers(vlm, pictures):
    """The first reply token's top 20 log probabilities, against transformers' float32 model
    on the same pixels and tokens (image tokens attending to each other, as Gemma 3 does).
    Tolerance 5e-3 nats: the projector's matrices are F16 in the GGUF (float32 in
    transformers), and llama.cpp sums in another order; measured 5e-4. A different picture
    moves them by far more."""
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, Gemma3ForConditionalGeneration

    model = vlm["F32"]
    images = {name: read_image_file(path) for name, path in pictures.items()}
    e = engine(model, projector=vlm["mmproj-F16"])
    try:
        ours, tokens = {}, {}
        for name, image in images.items():
            tokens[name] = prompt_tokens(e, model, image)
            got = e.run(Request(1, tokens[name], dataclasses_replace(GREEDY, max_tokens=1),
                                 images=(image,), logprobs=20))[1]
            ours[name] = (got.stats.token_ids[0],
                          [x.logprob for x in got.logprobs[0].top])
    finally:
        e.close()
    reference = Gemma3ForConditionalGeneration.from_pretrained(
        vlm["checkpoint"], dtype=torch.float32).eval()
    processor = AutoImageProcessor.from_pretrained(vlm["checkpoint"])
    for name, path in pictures.items():
        key = placeholder(images[name])
        ids = torch.tensor([[reference.config.image_token_id if t == key else t
                             for t in tokens[name]]])
        kinds = torch.tensor([[int(t == key) for t in tokens[name]]])
        pixels = processor(Image.open(path).convert("RGB"), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            logits = reference(input_ids=ids, pixel_values=pixels, token_type_ids=kinds).logits
        theirs = torch.log_softmax(logits[0, -1].double(), -1)
        top = torch.topk(theirs, 20)
        assert ours[name][0] == int(top.indices[0])
        assert np.max(np.abs(np.array(ours[name][1]) - top.values.numpy())) < 5e-3
    moved = np.max(np.abs(np.array(ours["a"][1]) - np.array(ours["b"][1])))
    assert moved > 0.05


def dataclasses_replace(params: GenerationParams, **changes) -> GenerationParams:
    import dataclasses

    return dataclasses.replace(params, **changes)


def test_a_follow_up_keeps_the_image_in_the_cache_and_another_image_does_not(vlm, pictures):
    model = vlm["Q8_0"]
    a, b = (read_image_file(pictures[n]) for n in ("a", "b"))
    e = engine(model, projector=vlm["mmproj-F16"])
    try:
        first = prompt_tokens(e, model, a)
        e.run(Request(1, first, GREEDY, images=(a,)))
        again = e.run(Request(2, first, GREEDY, images=(a,)))[2].stats
        assert again.cached_tokens == len(first) - 1
        other = prompt_tokens(e, model, b)
        stats = e.run(Request(3, other, GREEDY, images=(b,)))[3].stats
        image_at = other.index(placeholder(b))
        assert stats.cached_tokens == image_at  # the text before it, not a token of it
    finally:
        e.close()


def test_two_sequences_with_images_at_once_answer_as_alone(vlm, pictures):
    model = vlm["Q8_0"]
    a, b = (read_image_file(pictures[n]) for n in ("a", "b"))
    e = engine(model, projector=vlm["mmproj-F16"], n_parallel=2)
    try:
        ta, tb = prompt_tokens(e, model, a), prompt_tokens(e, model, b)
        alone = {1: e.run(Request(1, ta, GREEDY, images=(a,), cache_prompt=False))[1],
                 2: e.run(Request(2, tb, GREEDY, images=(b,), cache_prompt=False))[2]}
        together = e.run(Request(3, ta, GREEDY, images=(a,), cache_prompt=False),
                         Request(4, tb, GREEDY, images=(b,), cache_prompt=False))
        assert together[3].text == alone[1].text
        assert together[4].text == alone[2].text
    finally:
        e.close()


def cached_and_fresh(vlm):
    """The tiny Gemma 3 on two slots with host memory for its cache, the same without (flash
    attention off on both: bit for bit), and two prompts that share their first 12 tokens."""
    model = vlm["Q8_0"]
    e = engine(model, n_parallel=2, cache_ram=1 << 30, flash_attention=False)
    fresh = engine(model, n_parallel=2, flash_attention=False)
    a = e.tokenize("The patient is a 67-year-old man with chest pain radiating to the left "
                   "arm and sweating for two hours. What now? " * 2)
    b = a[:12] + e.tokenize(" Something else: the kidney and liver function tests of a "
                            "woman of 40.", add_bos=False)
    return e, fresh, a, b


def test_a_sliding_window_model_follows_up_from_cells_it_really_has(vlm):
    """Gemma 3's sliding-window layers: conversations that take each other's slot, with host
    memory for the cache, answer as a whole prefill does (flash attention off: bit for bit).
    A state read back from host memory lacked the window's cells, and follow-ups went wrong."""
    e, fresh, a, b = cached_and_fresh(vlm)
    try:
        def first(engine_, rid, tokens, cache=True):
            got = engine_.run(Request(rid, tokens, GREEDY, logprobs=5, cache_prompt=cache))
            return [x.logprob for x in got[rid].logprobs[0].top]

        want = {"a": first(fresh, 1, a, False), "b": first(fresh, 2, b, False)}
        for rid, (name, tokens) in enumerate([("a", a), ("b", b)] * 2):
            assert first(e, rid + 1, tokens) == want[name], (rid, name)
    finally:
        e.close()
        fresh.close()


def test_a_sliding_window_follow_up_goes_on_from_its_prompts_window(vlm):
    """A conversation whose slot another took comes back from host memory, which holds only the
    window of its last cells: its follow-up edits the end of the last reply (so it shares less
    than those cells), and goes on from the window copied when its prompt was prefilled (a
    checkpoint, as llama-server keeps them), not from the start; answered as a whole prefill
    is, bit for bit (flash attention off). Before, a sliding-window model kept no host cache and
    prefilled it all again."""
    e, fresh, a, b = cached_and_fresh(vlm)
    try:
        def run(engine_, rid, tokens, cache=True):
            return engine_.run(Request(rid, tokens, GREEDY, logprobs=5,
                                       cache_prompt=cache))[rid]

        reply = run(e, 1, a).stats.token_ids
        assert len(reply) > 8  # past the tiny model's 8-token window
        edited = a + reply[:-4] + e.tokenize(" And the troponin?", add_bos=False)
        run(e, 2, b)  # takes a's slot: a's cells go to host memory
        got, want = run(e, 3, edited), run(fresh, 4, edited, cache=False)
        assert got.stats.cached_tokens == len(a), (got.stats.cached_tokens, len(a))
        assert [x.logprob for x in got.logprobs[0].top] == \
            [x.logprob for x in want.logprobs[0].top]
        assert got.text == want.text
    finally:
        e.close()
        fresh.close()


# --- bad images and projectors --------------------------------------------------------------------

def png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` pixels: its header and one tiny data chunk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + \
            struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2,
                                                             0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_bad_images_get_one_line_each(tmp_path, pictures):
    from PIL import Image

    good = pictures["a"].read_bytes()
    cases = {
        "not an image": (b"%PDF-1.7 not a picture", "not an image"),
        "truncated": (good[:len(good) // 2], "truncated"),
        "bomb": (png_header(50_000, 50_000), "megapixels"),
        "large": (png_header(8_000, 6_000), "8000 x 6000 pixels"),
        "gif": (None, "a GIF image"),
    }
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, "GIF")
    cases["gif"] = (gif.getvalue(), "a GIF image")
    for name, (data, said) in cases.items():
        with pytest.raises(ImageError, match=said) as refused:
            read_image(data, name)
        assert "\n" not in str(refused.value)
    assert 50_000 * 50_000 > MAX_PIXELS
    webp, jpeg = io.BytesIO(), io.BytesIO()
    Image.open(pictures["a"]).save(webp, "WEBP", lossless=True)
    Image.open(pictures["a"]).save(jpeg, "JPEG")
    assert read_image(webp.getvalue(), "w").rgb == read_image(good, "p").rgb  # lossless
    assert read_image(jpeg.getvalue(), "j").format == "JPEG"
    with pytest.raises(ImageError, match="only data: URLs"):
        read_data_url("https://example.org/xray.png", "image 1")
    with pytest.raises(ImageError, match="base64"):
        read_data_url("data:image/png;base64,@@@", "image 1")
    with pytest.raises(ImageError, match="No such file"):
        read_image_file(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="a folder"):
        read_image_file(tmp_path)


def test_projectors_that_do_not_fit_are_refused_from_their_headers(vlm, tmp_path):
    from localmed.projector import pair
    from tests.real_models import smollm2_gguf

    other = smollm2_gguf()  # a model 576 wide; the tiny projector makes 256-wide embeddings
    with pytest.raises(ProjectorError, match="belongs to another model"):
        pair(other, vlm["mmproj-F16"])
    with pytest.raises(ProjectorError, match="not a vision projector"):
        pair(vlm["Q8_0"], other)
    with pytest.raises(ProjectorError, match="no such projector"):
        pair(vlm["Q8_0"], tmp_path / "none.gguf")
    # moved without its projector: text only, and why
    moved = tmp_path / vlm["Q8_0"].name
    moved.write_bytes(vlm["Q8_0"].read_bytes())
    manifest = vlm["Q8_0"].with_name(vlm["Q8_0"].name.replace(".gguf", ".manifest.json"))
    (tmp_path / manifest.name).write_text(manifest.read_text())
    pairing = pair(moved)
    assert pairing.projector is None and "moved without it" in pairing.absent


# --- serve, through the openai client -------------------------------------------------------------

@pytest.fixture(scope="module")
def server(vlm):
    running = Server(vlm["Q8_0"], "--ctx", "2048", "--parallel", "2")
    banner = running.banner()
    assert "images: taken" in banner
    # a sliding-window model's host cache keeps its windows (see the follow-up test above)
    assert "--cache-ram), with their 8-token window as each prompt left it" in banner, banner
    yield running
    running.stop()


def ask(client, model: str, url: str, question: str = QUESTION, **extra):
    return client.chat.completions.create(
        model=model, max_tokens=16, temperature=0, extra_body={"repeat_penalty": 1.0},
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": question}]}], **extra)


def test_serve_answers_an_image_as_the_engine_does_and_caches_it(server, vlm, pictures):
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", timeout=120)
    model = client.models.list().data[0].id
    url = data_url(pictures["a"].read_bytes())
    first = ask(client, model, url)
    e = engine(vlm["Q8_0"], projector=vlm["mmproj-F16"])
    try:
        image = read_image_file(pictures["a"])
        tokens = prompt_tokens(e, vlm["Q8_0"], image)
        alone = e.run(Request(1, tokens, GREEDY, images=(image,)))[1].text
    finally:
        e.close()
    assert first.choices[0].message.content == alone
    assert first.usage.prompt_tokens == len(tokens)
    again = ask(client, model, url)
    assert again.choices[0].message.content == alone
    assert again.usage.prompt_tokens_details.cached_tokens == len(tokens) - 1


def test_serve_takes_two_image_requests_at_once(server, pictures):
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", timeout=120)
    model = client.models.list().data[0].id
    urls = {n: data_url(p.read_bytes()) for n, p in pictures.items()}
    alone = {n: ask(client, model, u, "What is it?").choices[0].message.content
             for n, u in urls.items()}
    together: dict[str, str] = {}

    def one(name: str) -> None:
        together[name] = ask(client, model, urls[name], "What is it?").choices[0].message.content

    threads = [threading.Thread(target=one, args=(n,)) for n in urls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert together == alone and alone["a"] != alone["b"]


def test_serve_refuses_bad_images_with_a_400_and_goes_on(server, pictures):
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", timeout=120)
    model = client.models.list().data[0].id
    good = pictures["a"].read_bytes()
    bad = {
        "https://example.org/chest-xray.png": "only data: URLs",
        data_url(b"not a picture at all"): "not an image",
        data_url(good[:200]): "truncated",
        data_url(png_header(50_000, 50_000)): "refused before decoding",
        "data:image/png;base64,%%%": "base64",
    }
    for url, said in bad.items():
        with pytest.raises(openai.BadRequestError) as refused:
            ask(client, model, url)
        assert said in refused.value.body["message"]
        assert refused.value.body["param"] == "messages[0].content[0].image_url"
    with pytest.raises(openai.BadRequestError, match="image_url in a user message"):
        client.chat.completions.create(model=model, max_tokens=4, messages=[
            {"role": "system", "content": [{"type": "image_url",
                                            "image_url": {"url": data_url(good)}}]},
            {"role": "user", "content": "Hello"}])
    with pytest.raises(openai.BadRequestError, match="up to 16 are taken"):
        client.chat.completions.create(model=model, max_tokens=4, messages=[
            {"role": "user", "content": [{"type": "image_url",
                                          "image_url": {"url": data_url(good)}}] * 17}])
    assert ask(client, model, data_url(good)).choices[0].message.content


def test_a_text_model_refuses_an_image_with_a_400(converted, pictures):
    import openai

    running = Server(converted["llama"]["Q8_0"], "--ctx", "256")
    try:
        assert "images: " in running.banner()
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="none", timeout=60)
        model = client.models.list().data[0].id
        with pytest.raises(openai.BadRequestError) as refused:
            ask(client, model, data_url(pictures["a"].read_bytes()))
        assert refused.value.body["code"] == "images_not_supported"
        assert "no vision projector" in refused.value.body["message"]
        reply = client.chat.completions.create(model=model, max_tokens=4, messages=[
            {"role": "user", "content": "Hello"}])
        assert reply.choices[0].finish_reason
    finally:
        running.stop()


def test_serve_with_a_projector_of_another_model_exits_with_one_line(vlm):
    from tests.real_models import smollm2_gguf

    done = subprocess.run([sys.executable, "-m", "localmed", "serve", str(smollm2_gguf()),
                           "--mmproj", str(vlm["mmproj-F16"]), "--port", str(free_port())],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error:") and "belongs to another model" in done.stderr
    assert "Traceback" not in done.stderr


# --- chat in a real terminal ----------------------------------------------------------------------

def test_chat_attaches_an_image_under_tmux(vlm, pictures, tmp_path):
    """`/image PATH`, then a question: the thumbnail and the image's name above it, a reply,
    the banner. Then Ctrl+O: the file picker (opening in the home folder) attaches the next."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "b.png").write_bytes(pictures["b"].read_bytes())
    env = {"LOCALMED_DATA_DIR": str(tmp_path / "data"), "PATH": os.environ["PATH"],
           "HOME": str(home), "TERM": "xterm-256color"}
    command = f"{sys.executable} -m localmed chat {vlm['Q8_0']} --max-tokens 8"
    with Terminal(f"localmed-vision-{os.getpid()}", command, width=110, height=40,
                  env=env) as terminal:
        terminal.wait(lambda s: "Ask the model" in s, "the chat screen", timeout=120)
        terminal.type(f"/image {tmp_path / 'nothing.png'}")
        terminal.press("Enter")
        terminal.wait(lambda s: "Not attached" in s, "the refusal of a missing file")
        terminal.type(f"/image {pictures['a']}")
        terminal.press("Enter")
        terminal.wait(lambda s: "1 image attached" in s, "the attachment")
        terminal.type("What does it show?")
        terminal.press("Enter")
        shown = terminal.wait(lambda s: "tok/s" in s and "– tok/s" not in s, "the reply",
                              timeout=120)
        assert "image: a.png (PNG, 64x64)" in shown
        assert "▀" in shown  # the thumbnail, in half blocks
        assert "Not medical advice" in shown
        assert "Traceback" not in shown
        terminal.press("C-o")
        terminal.wait(lambda s: "Attach an image" in s and "b.png" in s, "the file picker")
        terminal.press("Down")
        terminal.press("Enter")
        # the status line comes a frame before the notice: wait for both
        shown = terminal.wait(lambda s: "1 image attached" in s and "Attached b.png" in s,
                              "the picked image")
        assert "Attached b.png" in shown and "Not medical advice" in shown


# --- pull -----------------------------------------------------------------------------------------

def test_pull_takes_the_repository_s_projector_beside_the_model(vlm, pictures, tmp_path):
    """A hub repository as llama.cpp's releases lay one out (the model, and ``mmproj-*.gguf``
    files), through the real huggingface_hub against a local hub: the projector comes with the
    model, checked, and the model then takes images; a projector of another model in the
    repository is refused in one line, and nothing is placed."""
    from localmed.projector import pair
    from tests.fake_hub import FakeHub
    from tests.real_models import smollm2_gguf

    data = tmp_path / "data"
    for repo, files, ok in [
        ("someone/tiny-medgemma-GGUF", {"tiny-medgemma-Q8_0.gguf": vlm["Q8_0"],
                                        "tiny-medgemma-F32.gguf": vlm["F32"],
                                        "mmproj-tiny-medgemma-f16.gguf": vlm["mmproj-F16"]}, True),
        ("someone/mixed-up-GGUF", {"mixed-up-Q4_1.gguf": smollm2_gguf(),
                                   "mmproj-f16.gguf": vlm["mmproj-F16"]}, False)]:
        hub = FakeHub(repo, files)
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0",
               "HF_HUB_CACHE": str(tmp_path / "hf"), "HF_HUB_DISABLE_XET": "1",
               "LOCALMED_DATA_DIR": str(data)}
        try:
            done = subprocess.run([sys.executable, "-m", "localmed", "pull", f"{repo}:"
                                   f"{'Q8_0' if ok else 'Q4_1'}"], env=env, capture_output=True,
                                  text=True, timeout=300)
        finally:
            hub.close()
        if not ok:
            assert done.returncode == 2, done.stderr
            (line,) = done.stderr.strip().splitlines()
            assert "belongs to another model" in line
            assert not list((data / "models").glob("mixed-up*"))
    path = data / "models" / "tiny-medgemma.Q8_0.gguf"
    beside = data / "models" / "tiny-medgemma.mmproj-F16.gguf"
    assert beside.read_bytes() == vlm["mmproj-F16"].read_bytes()
    record = json.loads(path.with_name(path.name.replace(".gguf", ".manifest.json")).read_text())
    assert record["projector"]["file"] == beside.name
    assert record["projector"]["from"] == "mmproj-tiny-medgemma-f16.gguf"
    assert pair(path).projector.path == beside


# --- export ---------------------------------------------------------------------------------------

def test_export_carries_the_projector_to_lm_studio_and_tells_why_not_to_ollama(vlm, tmp_path):
    done = subprocess.run([sys.executable, "-m", "localmed", "export", str(vlm["Q8_0"]),
                           "--ollama", str(tmp_path / "ollama"), "--lmstudio",
                           str(tmp_path / "lms")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    said = " ".join(done.stdout.split())
    assert "images are not carried to Ollama" in said and "ollama/ollama#9967" in said
    modelfile = (tmp_path / "ollama" / "Modelfile").read_text()
    assert "# Note: images are not carried to Ollama" in modelfile
    (folder,) = (tmp_path / "lms" / "localmed").iterdir()
    projector = folder / f"mmproj-{vlm['mmproj-F16'].name}"
    assert projector.read_bytes() == vlm["mmproj-F16"].read_bytes()
    assert (folder / vlm["Q8_0"].name).is_file()


# --- chat --web, in a real browser ----------------------------------------------------------------

def test_chat_in_a_browser_sends_an_image_through_the_shared_engine(vlm, pictures, chromium,
                                                                    tmp_path):
    """`chat --web` loads the model (and its projector) once; the tab's chat attaches an
    image over the shared engine and gets a reply. The screenshot is left in tmp_path."""
    import re
    import time

    from playwright.sync_api import sync_playwright

    from tests.test_web import ANSI, CHROMIUM_ARGS, WebChat

    web = WebChat(vlm["Q8_0"], "--max-tokens", "8")
    frames: list[str] = []

    def wait_for(page, pattern: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if re.search(pattern, ANSI.sub("", "".join(frames))):
                return True
            page.wait_for_timeout(200)
        return False

    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1200, "height": 800})
                page.on("websocket", lambda ws: ws.on("framereceived", lambda f: frames.append(
                    f if isinstance(f, str) else f.decode("utf-8", "replace"))))
                page.goto(web.url)
                assert wait_for(page, r"Ask the model", 90)
                page.focus(".xterm-helper-textarea")
                page.keyboard.type(f"/image {pictures['a']}")
                page.keyboard.press("Enter")
                assert wait_for(page, r"1 image attached", 30)
                page.keyboard.type("What does this image show?")
                page.keyboard.press("Enter")
                assert wait_for(page, r"image: a\.png \(PNG, 64x64\)", 30)
                assert wait_for(page, r"\d+\.\d tok/s", 120)
                page.screenshot(path=tmp_path / "chat-web-image.png")
            finally:
                browser.close()
    finally:
        assert web.stop() == 0


def test_info_and_plan_name_the_projector_and_count_it(vlm):
    for command in ("info", "plan"):
        done = subprocess.run([sys.executable, "-m", "localmed", command, str(vlm["Q8_0"])],
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "COLUMNS": "200"})
        assert done.returncode == 0, done.stderr
        assert vlm["mmproj-F16"].name in done.stdout
    assert "counted in the plan" in done.stdout


def test_a_text_model_s_chat_refuses_an_image_in_one_line(smollm2, pictures):
    from localmed.chat import ChatModel, ChatSession
    from localmed.runtimes.batch_process import BatchClient, BatchOptions
    from localmed.runtimes.slot_runtime import SlotRuntime

    runtime = SlotRuntime(BatchClient(smollm2["gguf"], BatchOptions(1, 512, threads=2)))
    try:
        session = ChatSession.open(ChatModel("smollm2", smollm2["gguf"], None, ""), runtime)
        with pytest.raises(ImageError, match=r"takes no images: .*no vision projector"):
            session.attach(pictures["a"])
        assert session.pending == []
        assert "".join(session.ask("Hello")) is not None  # the chat goes on, text only
    finally:
        runtime.close()


def test_a_chat_message_with_an_image_goes_to_the_engine_once(vlm, pictures):
    """The chat counts a message to see that it fits, counts it again as it adds it, then
    sends it: the picture crosses the engine's pipe (and mtmd prepares it) once for the three,
    and once more for a follow-up, whose prompt is new."""
    from localmed.chat import ChatModel, ChatSession
    from localmed.images import Image
    from localmed.runtimes.batch_process import BatchClient, BatchOptions
    from localmed.runtimes.slot_runtime import SlotRuntime

    runtime = SlotRuntime(BatchClient(vlm["Q8_0"], BatchOptions(1, 1024, threads=2)))
    sent: list[int] = []
    tokenize = runtime.client.tokenize

    def counted(text, **kwargs):
        if not isinstance(text, str):
            sent.append(sum(isinstance(part, Image) for part in text))
        return tokenize(text, **kwargs)

    runtime.client.tokenize = counted
    try:
        session = ChatSession.open(ChatModel("tiny", vlm["Q8_0"], None, ""), runtime)
        session.params = GenerationParams(max_tokens=4, temperature=0)
        session.attach(pictures["a"])
        session.check_fits(QUESTION)
        "".join(session.ask(QUESTION))
        assert sent == [1]
        assert runtime.last_stats.prompt_tokens > 16  # the image's 16 tokens were sent
        session.check_fits("And the other corner?")
        "".join(session.ask("And the other corner?"))
        assert sent == [1, 1]
        assert runtime.last_stats.cached_tokens > 16  # the image's cells kept from turn 1
    finally:
        runtime.close()
