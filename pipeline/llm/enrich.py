"""LLM enrichment of subtitles: each subtitle gets a short rewrite that states its emotional context.

    summary = run_enrichment(clips, build_llm("transformers", {}), "features/llm_cache.sqlite",
                             "english", ENRICH_TEMPLATES, max_new_tokens=64, batch_size=8,
                             out_path="data/enriched.jsonl", max_failed_fraction=0.1)
    clips2 = enriched_manifest(clips, read_enriched("data/enriched.jsonl"))
    enrich_from_params(clips, params.llm, "data/enriched.jsonl")   # the stage's one call (EnrichConfig)

The output holds one JSON line per clip and language, `{name, language, subtitle,
enriched, status}`, in manifest order. `enriched_manifest` puts "subtitle\\n\\nenriched"
into the clips' subtitle fields, so the existing `text` extractor encodes the enriched
text with its own code. Answers are cached by (model, template, text) after each batch
(`pipeline.llm.backends.LLMCache`), so an interrupted run resumes, an unchanged rerun calls
the model zero times, and rows with the same language and subtitle are asked once per run
and once ever (greedy decoding gives them one answer). The log says the distinct and cached
counts before the first call and the projected time after the second batch (the first
loads the model).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from pipeline.config import ENRICH_TEMPLATES, LANGUAGES, ConfigError, EnrichConfig, from_dict  # noqa: F401
from pipeline.errors import MerError, ModelMissing
from pipeline.llm.backends import LLM, LLMCache, LLMError, build_llm, build_messages
from pipeline.manifest import Clip
from pipeline.tables import progress_bar, write_jsonl

log = logging.getLogger(__name__)

class EnrichmentFailed(MerError, RuntimeError):
    """Too many subtitles failed; finished answers are cached, so a rerun retries only those."""


@dataclass
class EnrichSummary:
    rows: int = 0  # clips x languages
    ok: int = 0
    empty: int = 0  # no subtitle: no call made
    failed: int = 0
    cached: int = 0  # answered from the cache
    asked: int = 0  # distinct prompts sent to the model by this run (equal subtitles are asked once)
    distinct: int = 0  # distinct (language, subtitle) among the non-empty rows
    seconds: float = 0.0


def _ask(llm: LLM, batch: list[list[dict[str, str]]], max_new_tokens: int) -> list[str | Exception]:
    """Answers in order; when the batch call fails, each subtitle is retried alone."""
    try:
        answers = list(llm.chat(batch, max_new_tokens))
        if len(answers) != len(batch):
            raise LLMError(f"{llm.backend} returned {len(answers)} answers for {len(batch)} prompts")
        return answers
    except Exception as err:  # noqa: BLE001 - per-subtitle boundary: record and go on
        if len(batch) == 1:
            return [err]
    return [answer for messages in batch for answer in _ask(llm, [messages], max_new_tokens)]


def _rows(clips: list[Clip], languages: tuple[str, ...]) -> list[dict[str, Any]]:
    return [{"name": c.name, "language": lang, "subtitle": getattr(c, lang).strip(), "enriched": "",
             "status": "ok" if getattr(c, lang).strip() else "empty_subtitle"}
            for c in clips for lang in languages]


def _enrich_group(llm: LLM, cache: LLMCache, groups: list[list[tuple[dict[str, Any], str]]],
                  templates: dict[str, str], max_new_tokens: int, summary: EnrichSummary, device: str) -> None:
    """Ask once per group of rows with the same language and subtitle; fill every row in place."""
    firsts = [group[0][0] for group in groups]
    messages = [build_messages(templates[row["language"]], row["subtitle"]) for row in firsts]
    answers = _ask(llm.ensure_loaded(device), messages, max_new_tokens)
    summary.asked += len(groups)
    for group, answer in zip(groups, answers):
        for row, key in group:
            if isinstance(answer, Exception) or not answer.strip():
                reason = f"{type(answer).__name__}: {answer}" if isinstance(answer, Exception) else "empty answer"
                row["status"] = f"failed: {reason}"
                log.debug("enrich %s/%s failed: %s", row["name"], row["language"], reason)
            else:
                row["enriched"] = answer.strip()
                cache.put(key, json.dumps(row["enriched"], ensure_ascii=False))
    cache.commit()  # per batch: an interrupted run keeps every finished batch


def _uncached_groups(rows: list[dict[str, Any]], cache: LLMCache, identity: dict[str, Any],
                     templates: dict[str, str], max_new_tokens: int,
                     summary: EnrichSummary) -> list[list[tuple[dict[str, Any], str]]]:
    """Fill cached rows; group the others by (language, subtitle): one model call per distinct prompt."""
    settings = {"max_new_tokens": max_new_tokens}
    groups: dict[tuple[str, str], list[tuple[dict[str, Any], str]]] = {}
    for row in rows:
        key = LLMCache.key(identity, templates[row["language"]], "enrich", row["subtitle"], settings)
        cached = cache.get(key)
        if cached is None:
            groups.setdefault((row["language"], row["subtitle"]), []).append((row, key))
        else:
            row["enriched"] = cached
            summary.cached += 1
    return list(groups.values())


def run_enrichment(clips: list[Clip], llm: LLM, cache_path: str | Path, language: str,
                   templates: dict[str, str], max_new_tokens: int, batch_size: int,
                   out_path: str | Path, max_failed_fraction: float, progress: bool = False,
                   device: str = "cpu") -> EnrichSummary:
    """Enrich every non-empty subtitle; write the rows atomically; raise past the failure threshold.

    The model loads on `device` at the first cache miss (not at all when everything is cached).
    """
    start = time.perf_counter()
    if language not in LANGUAGES:
        raise ValueError(f"language is {language!r}; use one of {', '.join(LANGUAGES)}")
    missing = [lang for lang in LANGUAGES[language] if not templates.get(lang)]
    if missing or batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"enrichment needs a template per language (missing {missing}), "
                         f"batch_size >= 1 and max_new_tokens >= 1")
    identity = llm.identity()  # ModelMissing before any work or model load
    rows = _rows(clips, LANGUAGES[language])
    todo = [r for r in rows if r["status"] == "ok"]
    summary = EnrichSummary(rows=len(rows), empty=len(rows) - len(todo))
    if llm.parallel > 1:  # an endpoint: `concurrency` in flight, and a batch twice that keeps its tail short
        batch_size = max(batch_size, 2 * llm.parallel)
    cache = LLMCache(cache_path)
    try:
        groups = _uncached_groups(todo, cache, identity, templates, max_new_tokens, summary)
        summary.distinct = len({(r["language"], r["subtitle"]) for r in todo})
        log.info("enrich: %d subtitles, %d distinct, %d rows answered from the cache: %d to ask the model",
                 len(todo), summary.distinct, summary.cached, len(groups))
        with progress_bar(len(groups), "enrich", "prompt", progress) as bar:
            for i in range(0, len(groups), batch_size):
                batch_start = time.perf_counter()
                _enrich_group(llm, cache, groups[i:i + batch_size], templates, max_new_tokens, summary, device)
                bar.update(len(groups[i:i + batch_size]))
                done = min(i + batch_size, len(groups))
                if i == batch_size:  # the cost, said before most of it is paid (the first batch loads the model)
                    each = (time.perf_counter() - batch_start) / (done - i)
                    log.info("enrich: %d prompt(s) at %.2fs each: about %.0fs for the %d left",
                             done - i, each, each * (len(groups) - done), len(groups) - done)
    finally:
        cache.close()
    failed = [r for r in todo if r["status"] != "ok"]
    summary.failed, summary.ok = len(failed), len(todo) - len(failed)
    summary.seconds = time.perf_counter() - start
    fraction = len(failed) / len(todo) if todo else 0.0
    if fraction > max_failed_fraction:
        examples = "; ".join(f"{r['name']}/{r['language']}: {r['status']}" for r in failed[:3])
        raise EnrichmentFailed(f"{len(failed)} of {len(todo)} subtitles failed ({fraction:.0%} > "
                               f"max_failed_fraction={max_failed_fraction}), e.g. {examples}. "
                               "Finished answers are cached: a rerun retries only the failed ones.")
    write_jsonl(Path(out_path), rows)
    log.info("enrich: %s", asdict(summary))
    return summary


def enrich_from_params(clips: list[Clip], cfg: EnrichConfig | dict[str, Any], out_path: str | Path,
                       device: str = "cpu", progress: bool = False) -> EnrichSummary:
    """The stage's call: params `llm:` (validated, or a raw mapping validated here), the backend, run."""
    if isinstance(cfg, dict):
        cfg = from_dict(EnrichConfig, cfg, "llm")
    try:
        llm = build_llm(cfg.backend, cfg.backend_options, "llm.backend_options")
        llm.identity()
    except ModelMissing as err:
        from pipeline.extract.engine import ModelMissingError  # the error stages report in one line

        raise ModelMissingError(f"params key 'llm.backend_options.{err.option}' must name "
                                f"{err.expected}; now {err.got!r}") from None
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(f"llm: {err}") from None
    templates = {"english": cfg.template_english, "chinese": cfg.template_chinese}
    return run_enrichment(clips, llm, cfg.cache_path, cfg.language, templates, cfg.max_new_tokens,
                          cfg.batch_size, out_path, cfg.max_failed_fraction, progress, device)


def read_enriched(path: str | Path) -> list[dict[str, Any]]:
    with Path(path).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def enriched_manifest(clips: list[Clip], enriched_rows: list[dict[str, Any]]) -> list[Clip]:
    """Copies of `clips` whose subtitle fields hold "subtitle\\n\\nenriched" where enrichment succeeded."""
    done = {(r["name"], r["language"]): r for r in enriched_rows if r["status"] == "ok" and r["enriched"]}
    out = []
    for clip in clips:
        changes = {lang: f"{row['subtitle']}\n\n{row['enriched']}"
                   for lang in ("chinese", "english") if (row := done.get((clip.name, lang)))}
        out.append(replace(clip, **changes))
    return out
