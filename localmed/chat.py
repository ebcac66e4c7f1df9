"""A chat session, without any UI: model, template, conversation and saving.

The Textual app drives one :class:`ChatSession`; everything it shows comes from here, so the rules
(which template, what prompt is sent, what is dropped from the context, where files go) are tested
without a terminal.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localmed import formats, library, paths
from localmed.conversation import (
    Conversation,
    HistoryStore,
    Prompt,
    export_markdown,
    fit_prompt,
)
from localmed.errors import (
    ImageError,
    LocalmedError,
    ModelNotAvailableError,
    SpeculationError,
    UnknownModelError,
    WorkerError,
)
from localmed.formats.info import ModelInfo
from localmed.images import Image, image_marker, new_nonce, prompt_parts, read_image_file
from localmed.registry import ModelEntry, Registry
from localmed.retrieval.grounding import (
    CitationCheck,
    Grounding,
    check_citations,
    fit_passages,
    grounded_question,
    passage_budget,
)
from localmed.runtimes.base import GenerationParams, GenerationStats, Runtime
from localmed.templates import Message, TemplateChoice, resolve_template

MESSAGE_FRAME = 6
"""Tokens a template adds around a message, at most in the usual ones (``<|im_start|>user\n``
… ``<|im_end|>\n``): a message's size when turns are chosen to drop; the prompt itself is
counted whole."""


@dataclass(frozen=True)
class ChatModel:
    """A model to chat with (any format in :mod:`localmed.formats`), and what the registry
    knows of it."""

    label: str
    path: Path
    entry: ModelEntry | None
    advisory: str


def resolve_chat_model(spec: str, registry: Registry, *, quant: str | None = None,
                       models_dir: Path | None = None) -> ChatModel:
    """``demo``, a registry id (its default or ``quant``), or a path to a model file or folder;
    a registry's embedding model is refused (it answers nothing)."""
    named = registry.get(spec)
    if named is None or named.kind != "embedding":  # (an embedding id: said before its file)
        model = resolve_model(spec, registry, quant=quant, models_dir=models_dir)
        named = model.entry
    if named is not None and named.kind == "embedding":
        raise LocalmedError(f"{named.id} is an embedding model: it finds passages and answers "
                            f"nothing (index a folder with it: localmed docs add FOLDER --embed "
                            f"{named.id}); chat with a chat model")
    return model


def resolve_model(spec: str, registry: Registry, *, quant: str | None = None,
                  models_dir: Path | None = None) -> ChatModel:
    """``demo``, a registry id (its default or ``quant``), or a path to a model file or folder,
    of any kind."""
    from localmed.demo import DEMO_ENTRY, DEMO_ID, demo_model
    from localmed.quants import get_quant

    models_dir = models_dir or library.models_dir()
    if spec == DEMO_ID:
        path = demo_model()
        return ChatModel("demo (not a medical model)", path, DEMO_ENTRY, DEMO_ENTRY.advisory)
    candidate = Path(spec).expanduser()
    if candidate.exists() or candidate.suffix == ".gguf":
        info = formats.describe(candidate)
        entry = registry.get(info.model_id) if info.model_id else None
        return ChatModel(candidate.name, candidate, entry,
                         info.advisory or (entry.advisory if entry else ""))
    if spec not in registry:
        pulled = library.local_quants(spec, models_dir)
        if not pulled:
            raise UnknownModelError(spec, [*registry, DEMO_ID])
        # a model placed by `localmed pull` (or by hand) under a library name
        wanted = get_quant(quant).name if quant else None
        if wanted is None and len(pulled) > 1:
            raise LocalmedError(f"{spec} has {len(pulled)} quants in {models_dir} "
                                f"({', '.join(pulled)}): choose one with --quant")
        name = wanted or pulled[0]
        path = library.find_gguf(spec, name, models_dir)
        if path is None:
            raise ModelNotAvailableError(spec, name, f"localmed pull REPO:{name} (it has "
                                         f"{', '.join(pulled)})", models_dir)
        return ChatModel(f"{spec} {name}", path, None, formats.describe(path).advisory)
    entry = registry[spec]
    quant_name = get_quant(quant).name if quant else entry.default_quant
    path = library.find_gguf(entry.id, quant_name, models_dir)
    if path is None:
        command = f"localmed pull {entry.id}:{quant_name}" if entry.gguf_repos else \
            f"localmed quantize {entry.id} --quant {quant_name}"
        raise ModelNotAvailableError(entry.id, quant_name, command, models_dir)
    return ChatModel(f"{entry.id} {quant_name}", path, entry, entry.advisory)


@dataclass
class ChatSession:
    """What the chat app holds: a loaded runtime, the active template and the conversation."""

    model: ChatModel
    runtime: Runtime
    template_choice: TemplateChoice
    save_history: bool = False
    params: GenerationParams = field(default_factory=GenerationParams)
    history: HistoryStore = field(default_factory=HistoryStore)
    conversation: Conversation = field(init=False)
    last_prompt: Prompt | None = field(default=None, init=False)
    pending: list[Image] = field(default_factory=list, init=False)
    """Images attached to the next message."""
    images: dict[int, list[Image]] = field(default_factory=dict, init=False)
    """The images of this conversation's user messages, by message index (kept in memory
    only: a saved conversation records their names)."""
    _nonce: str = field(default_factory=new_nonce, init=False)
    retriever: Any = field(default=None, init=False)
    """The document index questions are answered from (``--docs``, ``/docs NAME``): a
    :class:`~localmed.retrieval.search.Retriever`; None: the model's own knowledge."""
    docs_k: int = 5
    """Passages a question gets at most (fewer where the context has no room for them)."""
    last_grounding: Grounding | None = field(default=None, init=False)
    last_check: CitationCheck | None = field(default=None, init=False)
    _said: tuple[int, bool] = field(default=(0, True), init=False)
    """The last prompt's beginning that :meth:`dropped_notice` told of."""
    _sizes: dict[tuple[str, str], int] = field(default_factory=dict, init=False)
    """Each message's tokens (its images' included), by role and text: counted once."""

    def __post_init__(self) -> None:
        self.conversation = self._new_conversation()

    @classmethod
    def open(cls, model: ChatModel, runtime: Runtime, *, template: str | None = None,
             save_history: bool = False, system: str = "") -> ChatSession:
        choice = choose_template(model, runtime.info, template)
        session = cls(model, runtime, choice, save_history)
        session.conversation.system = system
        return session

    def _new_conversation(self) -> Conversation:
        return Conversation(model=self.model.label, template=self.template_choice.template.name)

    @property
    def template_name(self) -> str:
        return self.template_choice.template.name

    def set_template(self, name: str) -> TemplateChoice:
        """Switch the prompt template live; the next prompt uses it."""
        self.template_choice = choose_template(self.model, self.runtime.info, name)
        self.conversation.template = self.template_name
        return self.template_choice

    def set_system(self, text: str) -> None:
        self.conversation.system = text.strip()

    def new_chat(self) -> None:
        system = self.conversation.system
        self.conversation = self._new_conversation()
        self.conversation.system = system
        self.images, self.pending = {}, []
        self.last_prompt = None

    def load(self, conversation: Conversation) -> None:
        self.conversation = conversation
        self.images, self.pending = {}, []
        self.last_prompt = None

    @property
    def no_images(self) -> str:
        """Why this model takes no images ("": it takes them)."""
        return getattr(self.runtime, "no_images", "it reads text only")

    def attach(self, path: Path) -> Image:
        """Read an image for the next message (:class:`ImageError` in one line: not an image,
        too large, or a model that reads text only)."""
        if self.no_images:
            raise ImageError(f"this model takes no images: {self.no_images}")
        image = read_image_file(path)
        self.pending.append(image)
        return image

    def _marked(self, conversation: Conversation) -> tuple[Conversation, dict[str, Image]]:
        """``conversation`` with each user message's images as markers before its text (as
        clinicians send a picture, then ask), and the images by marker."""
        if not self.images:
            return conversation, {}
        by_marker: dict[str, Image] = {}
        messages = []
        for i, message in enumerate(conversation.messages):
            marks = ""
            for image in self.images.get(i, []):
                marker = image_marker(self._nonce, len(by_marker))
                by_marker[marker] = image
                marks += marker
            messages.append(Message(message.role, marks + message.content) if marks
                            else message)
        return dataclasses.replace(conversation, messages=messages), by_marker

    # --- documents ------------------------------------------------------------------------------

    @property
    def docs(self) -> str:
        """The index answering questions ("": none)."""
        return self.retriever.name if self.retriever is not None else ""

    def set_docs(self, retriever: Any) -> None:
        """Answer from ``retriever``'s index from the next question on (None: from none); the
        one it replaces is closed."""
        from localmed.retrieval.catalog import close_retriever

        old, self.retriever = self.retriever, retriever
        if old is not None and old is not retriever:
            close_retriever(old)

    def ground(self, text: str) -> Grounding | None:
        """The passages of the index for ``text``, as many as the context has room for beside
        the question and the reply (none when nothing clears the relevance floor)."""
        retriever = self.retriever
        if retriever is None:
            return None
        found = retriever.search(text, k=self.docs_k)
        notes = tuple(found.notes)
        folder = str(retriever.index.meta("folder", ""))
        if not found.grounded:
            return Grounding(retriever.name, (), False, notes, folder)
        alone = Conversation(model=self.conversation.model, template=self.conversation.template,
                             system=self.conversation.system)
        alone.add("user", grounded_question(text, Grounding(retriever.name, (), True)))
        room = self.runtime.n_ctx - self._reserve() - self._prompt_for(alone)[0].tokens
        budget = min(passage_budget(self.runtime.n_ctx, self._reserve()), room)
        kept = fit_passages(found.passages,
                            lambda t: self.runtime.count_tokens(t, add_bos=False), budget)
        if len(kept) < len(found.passages):
            notes += (f"{len(kept)} of {len(found.passages)} passages fit the "
                      f"{self.runtime.n_ctx}-token context beside the question",)
        return Grounding(retriever.name, tuple(kept), bool(kept), notes, folder)

    def _reserve(self) -> int:
        return min(self.params.max_tokens, self.runtime.n_ctx // 4)

    def context_used(self) -> int:
        return self.last_prompt.tokens + self.runtime.last_stats.generated_tokens \
            if self.last_prompt else 0

    def _prompt_for(self, conversation: Conversation,
                    start: int = 0) -> tuple[Prompt, dict[str, Image]]:
        marked, by_marker = self._marked(conversation)

        def count(text: str, add_bos: bool = True) -> int:
            # an image counts as the tokens the projector makes of it
            if by_marker and any(marker in text for marker in by_marker):
                return len(self.runtime.tokenize(prompt_parts(text, by_marker), add_bos=add_bos))
            return self.runtime.count_tokens(text, add_bos=add_bos)

        def size(i: int) -> int:
            message = marked.messages[i]
            key = (message.role, message.content)
            if key not in self._sizes:
                self._sizes[key] = count(message.content, add_bos=False) + MESSAGE_FRAME
            return self._sizes[key]

        prompt = fit_prompt(self.template_choice.template, marked, count, self.runtime.n_ctx,
                            reserve=self._reserve(), size=size, start=start)
        return prompt, by_marker

    def check_fits(self, text: str) -> None:
        """Raise ContextFullError (with the token count and the limit) if ``text`` (and the
        images attached to it) cannot be sent even with every earlier turn left out; nothing
        is changed. One short render and count: the whole conversation is fitted by
        :meth:`ask`, off the app's event loop."""
        alone = Conversation(model=self.conversation.model, template=self.conversation.template,
                             system=self.conversation.system)
        alone.add("user", text)
        saved = self.images
        self.images = {0: list(self.pending)} if self.pending else {}
        try:
            self._prompt_for(alone)
        finally:
            self.images = saved

    def ask(self, text: str, grounding: Grounding | None = None) -> Iterator[str]:
        """Add the user's turn (with the images attached to it) and stream the reply; the
        reply is recorded when it ends, stopped or not. Raises ContextFullError before adding
        anything that cannot fit. ``grounding`` (from :meth:`ground`): the passages the model
        is given above the question; the conversation keeps the question as it was asked."""
        self.conversation.add("user", text)
        index = len(self.conversation.messages) - 1
        if self.pending:
            self.images[index] = self.pending
            self.conversation.attachments[str(index)] = [i.label for i in self.pending]
        sent = self.conversation
        if grounding is not None and grounding.passages:
            sent = dataclasses.replace(self.conversation, messages=[
                *self.conversation.messages[:-1],
                Message("user", grounded_question(text, grounding))])
        self.last_grounding, self.last_check = grounding, None
        try:
            prompt, by_marker = self._prompt_for(
                sent, self.last_prompt.start if self.last_prompt else 0)
        except Exception:
            self.conversation.messages.pop()
            self.images.pop(index, None)
            self.conversation.attachments.pop(str(index), None)
            raise
        self.pending = []
        self.last_prompt = prompt
        parts: list[str] = []
        sent = prompt_parts(prompt.text, by_marker) if by_marker else prompt.text
        try:
            for piece in self.runtime.stream(sent, self.params,  # type: ignore[arg-type]
                                             stop=self.template_choice.template.stop):
                parts.append(piece)
                yield piece
        finally:
            reply = "".join(parts).strip()
            self.conversation.add("assistant", reply)
            if grounding is not None:
                self.last_check = check_citations(reply, grounding)
                self.conversation.sources[str(index + 1)] = grounding.record(self.last_check)
            if self.save_history:
                self.history.save(self.conversation)

    def dropped_notice(self) -> str:
        """What the last prompt left out, once each time that changes ("": nothing new)."""
        prompt = self.last_prompt
        said, self._said = self._said, (prompt.start, prompt.first_kept) if prompt else (0, True)
        if prompt is None or not prompt.dropped_turns or said == self._said:
            return ""
        kept = "the system prompt and your first message and its answer are kept" \
            if prompt.first_kept else ("your first message and its answer no longer fit beside "
                                       "the newest one and were left out too")
        return (f"The conversation outgrew the {self.n_ctx}-token context: "
                f"{prompt.dropped_turns} earlier messages are left out of the prompt; {kept}.")

    @property
    def stats(self) -> GenerationStats:
        return self.runtime.last_stats

    def stop(self) -> None:
        self.runtime.stop()

    # --- the engine as the app sees it: the app asks its session, never the runtime ----------

    @property
    def info(self) -> ModelInfo:
        return self.runtime.info

    @property
    def plan(self) -> Any:
        return self.runtime.plan

    @property
    def n_ctx(self) -> int:
        """Tokens the conversation's prompt and reply may hold."""
        return self.runtime.n_ctx

    def engine_notices(self) -> list[str]:
        """What befell the engine since the last call (it died, and was loaded again)."""
        return self.runtime.notices()

    def restart(self) -> None:
        """Load the model again after its engine died; the conversation is kept."""
        self.runtime.restart()

    def close(self) -> None:
        """End the engine and let go of the document index."""
        self.set_docs(None)
        self.runtime.close()

    def set_saving(self, on: bool) -> Path | None:
        """Turn saving on (the conversation so far is written at once) or off."""
        self.save_history = on
        if on and self.conversation.messages:
            return self.history.save(self.conversation)
        return None

    def export(self, path: Path | None = None) -> Path:
        """Markdown export, disclaimer first; default path in the data dir's exports folder."""
        if path is None:
            folder = paths.data_dir() / "exports"
            folder.mkdir(parents=True, exist_ok=True)
            os.chmod(folder, 0o700)
            path = folder / f"{self.conversation.id}.md"
        return export_markdown(self.conversation, path, self.model.advisory)


def open_runtime(model: ChatModel, *, n_ctx: int | None = None, gpu_layers: int | None = None,
                 threads: int | None = None, in_process: bool = False,
                 batch_seconds: float | None = None, projector: Path | None = None,
                 on_restart: Callable[[str], None] | None = None,
                 speculation: bool = False, draft: Path | None = None,
                 rpc: Any = None) -> Runtime:
    """The chat's Runtime, in an engine process of its own unless ``in_process``: for a GGUF
    one conversation on llama.cpp's multi-sequence engine (the one ``localmed serve`` runs:
    the conversation's cells are kept between turns), joining the engine a ``chat --web``
    server shares where it says so (:mod:`localmed.runtimes.hub`); for a GPTQ
    folder transformers (:mod:`localmed.runtimes.process`). ``batch_seconds``: how often the
    engine sends streamed text on (its default: the server's); ``on_restart``: hears the engine
    die (it is loaded again at once) and a reload fail; ``rpc``: workers that hold part of the
    model (a :class:`~localmed.rpc.workers.Workers`)."""
    from localmed.runtimes.supervisor import BATCH_SECONDS

    options = formats.LoadOptions(n_ctx=n_ctx, gpu_layers=gpu_layers, threads=threads,
                                  speculation=speculation, draft=draft, rpc=rpc)
    if in_process:
        return formats.load_runtime(model.path, options)
    batch_seconds = BATCH_SECONDS if batch_seconds is None else batch_seconds
    if formats.format_of(model.path).name == "gguf":
        from localmed.runtimes import batch_process as engine
        from localmed.runtimes.hub import ENGINE_ADDRESS_ENV, ENGINE_KEY_ENV
        from localmed.runtimes.prompt_cache import CACHE_REUSE
        from localmed.runtimes.slot_runtime import SlotRuntime

        if address := os.environ.get(ENGINE_ADDRESS_ENV):
            key = bytes.fromhex(os.environ.get(ENGINE_KEY_ENV, ""))
            return SlotRuntime(engine.BatchClient.connect(address, key))
        return SlotRuntime(engine.BatchClient(
            model.path, engine.BatchOptions(1, n_ctx, gpu_layers, threads,
                                            projector=projector, cache_reuse=CACHE_REUSE,
                                            speculation=speculation, draft=draft, rpc=rpc),
            batch_seconds=batch_seconds, on_restart=on_restart))
    if rpc is not None:
        raise WorkerError("--rpc needs a GGUF: llama.cpp's engine splits a model over workers, "
                          "and a GPTQ folder runs on transformers")
    if draft is not None:
        raise SpeculationError("--draft needs a GGUF: llama.cpp's engine drafts, and a GPTQ "
                               "folder runs on transformers")
    if projector is not None:
        raise ImageError("--mmproj needs a GGUF: llama.cpp reads the image, and a GPTQ folder "
                         "runs on transformers")
    from localmed.runtimes.process import EngineRuntime

    return EngineRuntime(model.path, options, batch_seconds=batch_seconds,
                         on_restart=on_restart)


def choose_template(model: ChatModel, info: ModelInfo, requested: str | None) -> TemplateChoice:
    return resolve_template(
        requested, embedded=info.chat_template, bos_token=info.bos_token, add_bos=info.add_bos,
        eos_token=info.eos_token, registry_default=model.entry.template if model.entry else None,
        model_label=model.entry.id if model.entry else model.label)


def stdin_is_interactive() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()
