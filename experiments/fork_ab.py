"""The fusion members side by side on threads (the trainer's way) or in forked processes, same
process, rounds interleaved.

    python experiments/fork_ab.py [ROUNDS]

On threads, torch's ops release the GIL but the Python between them does not, so two members
on two cores run at about 0.6x the time of one after the other, not 0.5x. Here each member after
the first trains in a child forked for it, and sends its result back through a pipe (pickled:
our own process's objects, never a file). Five synthetic stores with the video stores' widths,
3,000 clips, params.yaml's train section. Prints seconds per fold and the members' seconds of
it per round, and whether both ways give the same probabilities (they must, to the bit). Not kept in
the trainer (README "Fusion": training speed). Run from the repository root.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import pickle
import sys
import time
from dataclasses import replace

import numpy as np

from pipeline.bench.train_speed import STORE_SETS, synthetic
from pipeline.config import load_params
from pipeline.fusion import train as trainer


def _child(train_member, index, connection) -> None:
    try:
        out = ("ok", train_member(index))
    except BaseException as err:  # noqa: BLE001 - sent to the parent, raised there
        out = ("error", err)
    connection.send_bytes(pickle.dumps(out, protocol=5))
    connection.close()
    os._exit(0)  # no atexit handlers or buffers of the parent's run twice


def forked_side_by_side(train_member, count: int, workers: int) -> list[dict]:
    if workers <= 1:
        return [train_member(i) for i in range(count)]
    context = multiprocessing.get_context("fork")
    results: list = [None] * count
    for start in range(0, count, workers):
        batch = list(range(start, min(start + workers, count)))
        children = []
        for index in batch[1:]:
            receive, send = context.Pipe(duplex=False)
            process = context.Process(target=_child, args=(train_member, index, send), daemon=True)
            process.start()
            send.close()
            children.append((index, process, receive))
        results[batch[0]] = train_member(batch[0])  # the parent trains the first meanwhile
        for index, process, receive in children:
            status, value = pickle.loads(receive.recv_bytes())
            process.join()
            if status != "ok":
                raise value
            results[index] = value
    return results


def main(rounds: int) -> None:
    dims = STORE_SETS["video"]
    clips, features = synthetic(dims, 3000)
    base = replace(load_params("params.yaml").train, stores=list(dims))
    threads = trainer._side_by_side
    spent, probs = collections.Counter(), {}

    def timed(side_by_side):
        def wrapper(*args):
            start = time.perf_counter()
            try:
                return side_by_side(*args)
            finally:
                spent["members"] += time.perf_counter() - start
        return wrapper

    try:
        for round_ in range(rounds):
            for name, side_by_side in (("threads", threads), ("fork", forked_side_by_side)):
                spent.clear()
                trainer._side_by_side = timed(side_by_side)
                result = trainer.cross_validate(clips, features, base, quiet=True, fold_lines=False)
                probs[name] = (result.oof_probs, result.unlabelled_probs)
                folds = len(result.seconds_per_fold)
                print(f"round {round_} {name}: {sum(result.seconds_per_fold) / folds:.2f} s/fold, members "
                      f"{spent['members'] / folds:.2f} s", flush=True)
            print("same probabilities:", all(np.array_equal(a, b) for a, b in zip(probs["threads"], probs["fork"])))
    finally:
        trainer._side_by_side = threads


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
