"""A stand-in enclave process for ``test_dynamic_memory.py``: unseals a sealed model exactly as the
enclave's boot does (``SealedModel.load_tensors`` straight into tensors, extras taken, the handler
loaded, ``protect_weights``), then serves commands from stdin so the test can read this process's memory
(``/proc/PID/mem``) from outside at chosen instants.

Usage: ``python memory_probe.py SEALED MODE BUDGET`` with the data key (hex) as stdin's first line (never
on the command line). Commands, one per line: ``embed`` (prints ``done``); ``pause K`` (runs an embed
that stops inside block K's pre-forward hook, after the block was decrypted, prints ``paused``);
``resume`` (lets it finish, prints ``done``); ``quit``.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

from enclave_app.config import WeightsPolicy
from enclave_app.models import load_handler
from enclave_app.outputs import SealedExtras
from enclave_app.weights import DynamicHandler, protect_weights
from nitrovault.envelope import SealedModel, zeroize

TEXTS = ["A man is eating food.", "The new movie is awesome.", "The cat sits outside."]


def _say(line: str) -> None:
    print(line, flush=True)


def main() -> None:
    path, mode, budget = sys.argv[1], sys.argv[2], int(sys.argv[3])
    key = bytearray.fromhex(sys.stdin.readline().strip())
    sealed = SealedModel.open(path)
    tensors = sealed.load_tensors(key)
    metadata = sealed.metadata(key)
    zeroize(key)
    SealedExtras.take(tensors, metadata, "m")
    handler: Any = load_handler(metadata["nitrovault.handler"], tensors, metadata)
    handler = protect_weights(WeightsPolicy(mode=mode, budget=budget), handler)
    del tensors
    handler.warm_up()
    _say("ready")
    worker: threading.Thread | None = None
    resume = threading.Event()
    for line in sys.stdin:
        command = line.split()
        if command == ["embed"]:
            handler.embed(TEXTS, normalize=True)
            _say("done")
        elif command[:1] == ["pause"] and isinstance(handler, DynamicHandler):
            block = handler.weights.blocks[int(command[1])].module
            resume.clear()

            def hold(*_: Any) -> None:
                _say("paused")
                resume.wait()

            hook = block.register_forward_pre_hook(hold)  # after the weights' own: the block is plaintext
            worker = threading.Thread(target=handler.embed, args=(TEXTS[:1],), kwargs={"normalize": True})
            worker.start()
            worker_hook = hook
        elif command == ["resume"] and worker is not None:
            resume.set()
            worker.join()
            worker_hook.remove()
            worker = None
            _say("done")
        elif command == ["quit"]:
            return


if __name__ == "__main__":
    main()
