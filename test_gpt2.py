"""gpt2.py: Hugging Face GPT-2 model directories, built here (random weights, a tokenizer trained on
a few lines), read into nanosp and compared with transformers' GPT2LMHeadModel reading the same
directory; then train.py --init gpt2:DIR fine-tunes, resumes and samples through the directory's
tokenizer. transformers is used by the tests only (these, and test_nanosp.py's outside reference);
nanosp never imports it.

Tolerances: float64 logits relative to the largest reference element, under 1e-10, unsharded and
at t = 2 with sequence parallelism (what differs is reduction order, ~1e-15). Token ids are
compared exactly.
"""
import json
import os
import random
import shutil

import pytest
import safetensors.torch
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import tokenizers
from tokenizers import ByteLevelBPETokenizer

import gpt2
import nanosp
import train
from test_train import error_of, free_port, load_ckpt, read_log, rel_err, run

os.environ["HF_HUB_OFFLINE"] = "1"  # transformers reads the local directories only
SHAPE = dict(n_layer=2, n_head=4, n_embd=32, n_positions=32, vocab_size=301)  # 301: padded at t = 2
LINES = ["def main():", "    return 0", "import os, sys", "for x in range(10):", "    print(x)",
         "the quick brown fox jumps over the lazy dog", "class Model(nn.Module):", "    pass"]
PROMPT = "def main():\n    print('the fox') # é 日本 <|endoftext|>"


# ----------------------------------------------------------------------------------------------
# model directories as people have them


def random_weights(seed=0, n_layer=2, n_embd=32, n_positions=32, vocab_size=301, **_):
    """GPT-2's weights in Hugging Face names (no 'transformer.' prefix, as openai-community/gpt2's
    model.safetensors has them), float64, with the causal-mask buffers; Conv1D weights (in, out)."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64) * 0.2
    C, P = n_embd, n_positions
    sd = {"wte.weight": r(vocab_size, C), "wpe.weight": r(P, C)}
    for i in range(n_layer):
        h = f"h.{i}."
        sd.update({h + "ln_1.weight": 1 + r(C), h + "ln_1.bias": r(C), h + "attn.bias": torch.ones(1, 1, P, P).tril(),
                   h + "attn.c_attn.weight": r(C, 3 * C), h + "attn.c_attn.bias": r(3 * C),
                   h + "attn.c_proj.weight": r(C, C), h + "attn.c_proj.bias": r(C),
                   h + "ln_2.weight": 1 + r(C), h + "ln_2.bias": r(C),
                   h + "mlp.c_fc.weight": r(C, 4 * C), h + "mlp.c_fc.bias": r(4 * C),
                   h + "mlp.c_proj.weight": r(4 * C, C), h + "mlp.c_proj.bias": r(C)})
    return {**sd, "ln_f.weight": 1 + r(C), "ln_f.bias": r(C)}


def write_config(directory, **changes):
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
              "layer_norm_epsilon": 1e-05, "n_ctx": SHAPE["n_positions"], "attn_pdrop": 0.1, "embd_pdrop": 0.1,
              "resid_pdrop": 0.1, "bos_token_id": 0, "eos_token_id": 0, **SHAPE, **changes}
    (directory / "config.json").write_text(json.dumps(config, indent=2))


def make_model_dir(directory, weights="safetensors", tokenizer="tokenizer.json"):
    """A GPT-2 directory: config.json; the weights as model.safetensors, sharded safetensors, or a
    torch-saved pytorch_model.bin with 'transformer.' names and the tied lm_head; the tokenizer as
    tokenizer.json, vocab.json + merges.txt, or none."""
    directory.mkdir(parents=True)
    write_config(directory)
    sd = random_weights()
    if weights == "safetensors":
        safetensors.torch.save_file(sd, directory / "model.safetensors", metadata={"format": "pt"})
    elif weights == "sharded":
        names, weight_map = sorted(sd), {}
        for k, part in enumerate((names[:len(names) // 2], names[len(names) // 2:])):
            shard = f"model-0000{k + 1}-of-00002.safetensors"
            safetensors.torch.save_file({n: sd[n] for n in part}, directory / shard, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, shard))
        total = sum(v.numel() * v.element_size() for v in sd.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        sd = {"transformer." + k: v for k, v in sd.items()}
        sd["lm_head.weight"] = sd["transformer.wte.weight"].clone()
        torch.save(sd, directory / "pytorch_model.bin")
    if tokenizer:
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(LINES * 4, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"])
        if tokenizer == "tokenizer.json":
            bpe.save(str(directory / "tokenizer.json"))
        else:
            bpe.save_model(str(directory))  # vocab.json, merges.txt
    return directory


VARIANTS = {"safetensors": ("safetensors", "tokenizer.json"), "sharded": ("sharded", None),
            "bin": ("bin", "vocab+merges")}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {name: make_model_dir(root / name, *how) for name, how in VARIANTS.items()}


def tokens(seed=1, T=32):
    return torch.randint(0, SHAPE["vocab_size"], (2, T), generator=torch.Generator().manual_seed(seed))


def nanosp_logits(directory, group=None, sequence_parallel=False):
    pretrained = gpt2.load(str(directory))
    cfg = nanosp.GPTConfig(**pretrained.shape, sequence_parallel=sequence_parallel, recompute="selective")
    model = nanosp.GPT(cfg, group=group).double().eval()
    model.load_full_state_dict(pretrained.state_dict)
    with torch.no_grad():
        return model(tokens())[0]


# ----------------------------------------------------------------------------------------------
# logits against transformers, unsharded and at t = 2 with sequence parallelism


def _t2_worker(rank, port, dirs, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        logits = {name: nanosp_logits(d, dist.group.WORLD, sequence_parallel=True) for name, d in dirs.items()}
        torch.save(logits, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def t2_logits(model_dirs, tmp_path_factory):
    """One world of 2 processes, spawned once: each rank's logits for every directory."""
    out = str(tmp_path_factory.mktemp("t2") / "logits")
    mp.start_processes(_t2_worker, args=(free_port(), {k: str(v) for k, v in model_dirs.items()}, out),
                       nprocs=2, start_method="spawn")
    return [torch.load(f"{out}.{rank}", weights_only=True) for rank in (0, 1)]


@pytest.fixture(scope="module")
def transformers_logits(model_dirs):
    from transformers import GPT2LMHeadModel

    logits = {}
    for name, directory in model_dirs.items():
        hf = GPT2LMHeadModel.from_pretrained(directory, dtype=torch.float64, attn_implementation="eager").eval()
        with torch.no_grad():
            logits[name] = hf(tokens()).logits
    return logits


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_equal_transformers_unsharded_and_t2_sp(variant, model_dirs, transformers_logits, t2_logits):
    want = transformers_logits[variant]
    assert want.dtype == torch.float64 and want.shape == (2, 32, SHAPE["vocab_size"])
    unsharded = nanosp_logits(model_dirs[variant])
    rank0, rank1 = t2_logits[0][variant], t2_logits[1][variant]
    print(f"{variant}: |nanosp - transformers| / max|transformers| = {rel_err(unsharded, want):.2e} "
          f"unsharded, {rel_err(rank0, want):.2e} at t=2 with SP")
    assert rel_err(unsharded, want) < 1e-10
    assert rel_err(rank0, want) < 1e-10 and torch.equal(rank0, rank1)  # identical on every rank


# ----------------------------------------------------------------------------------------------
# the tokenizer


@pytest.mark.parametrize("variant", ["safetensors", "bin"])
def test_prompt_round_trips_with_transformers_ids(variant, model_dirs):
    from transformers import AutoTokenizer, GPT2Tokenizer

    tokenizer = gpt2.load(str(model_dirs[variant])).tokenizer
    ids = tokenizer.encode(PROMPT)
    assert tokenizer.decode(ids) == PROMPT
    assert ids[-1] == 0  # <|endoftext|>, one special token, as GPT-2 treats it
    assert len(ids) < len(PROMPT.encode()) and max(ids) >= 256  # merges, not bytes
    # transformers reading the same files gives the same ids
    hf = (AutoTokenizer if variant == "safetensors" else GPT2Tokenizer).from_pretrained(model_dirs[variant])
    assert hf(PROMPT)["input_ids"] == ids
    # rebuilt from its JSON text alone (what a checkpoint keeps), it is the same tokenizer
    again = gpt2.Tokenizer(tokenizer.json)
    assert again.encode(PROMPT) == ids and again.vocab_size == tokenizer.vocab_size == 300


def test_directory_without_tokenizer_has_none(model_dirs):
    assert gpt2.load(str(model_dirs["sharded"])).tokenizer is None


def test_encode_refuses_a_tokenizer_that_changes_the_text(model_dirs):
    data = json.loads((model_dirs["safetensors"] / "tokenizer.json").read_text())
    data["normalizer"] = {"type": "Lowercase"}
    tokenizer = gpt2.Tokenizer(json.dumps(data), "lowercasing.json")
    with pytest.raises(ValueError, match=r"lowercasing.json does not reproduce --prompt: .* character 0 "):
        tokenizer.encode("Def main", "--prompt")


# ----------------------------------------------------------------------------------------------
# a directory with a missing, unreadable or inconsistent file: one line naming the file


def edit_config(**changes):
    def edit(d):
        write_config(d, **changes)
    return edit


def edit_weights(change):
    def edit(d):
        sd = safetensors.torch.load_file(d / "model.safetensors")
        change(sd)
        safetensors.torch.save_file(sd, d / "model.safetensors")
    return edit


def write(name, text):
    return lambda d: (d / name).write_text(text)


def remove(*names):
    return lambda d: [os.remove(d / n) for n in names]


BAD = {  # name: (edit of a good directory, what the message must contain)
    "no config": (remove("config.json"), "config.json: no such file"),
    "config not JSON": (write("config.json", '{"n_layer": 2,'), "config.json is not readable JSON"),
    "config a list": (write("config.json", "[]"), "config.json holds a JSON list"),
    "not gpt2": (edit_config(model_type="llama"), "model_type 'llama' is not GPT-2"),
    "n_layer a string": (edit_config(n_layer="2"), "n_layer='2' must be a positive integer"),
    "heads do not divide": (edit_config(n_head=5), "n_embd=32 is not divisible by n_head=5"),
    "alias contradicts": (edit_config(hidden_size=64), "hidden_size=64 contradicts n_embd=32"),
    "erf gelu": (edit_config(activation_function="gelu"), "activation_function='gelu' is not the GeLU with tanh"),
    "eps": (edit_config(layer_norm_epsilon=1e-6), "layer_norm_epsilon=1e-06, but nanosp's LayerNorm eps is 1e-5"),
    "n_inner": (edit_config(n_inner=96), "n_inner=96, but nanosp's MLP has 4 * n_embd = 128"),
    "layer scaling": (edit_config(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx=True"),
    "no scaling": (edit_config(scale_attn_weights=False), "scale_attn_weights=False"),
    "cross attention": (edit_config(add_cross_attention=True), "nanosp has no cross-attention"),
    "untied head": (edit_config(tie_word_embeddings=False), "tie_word_embeddings=False"),
    "no weights": (remove("model.safetensors"), "has no weights: expected model.safetensors or pytorch_model.bin"),
    "damaged weights": (write("model.safetensors", "not a safetensors file"), "cannot be read as safetensors"),
    "vocab differs": (edit_config(vocab_size=50257),
                      "model.safetensors: wte.weight is (301, 32) torch.float64, but with vocab_size=50257, "
                      "n_embd=32 it must be a floating (50257, 32)"),
    "positions differ": (edit_config(n_positions=64, n_ctx=64), "wpe.weight is (32, 32) torch.float64, but with "
                                                                "block_size=64, n_embd=32"),
    "layer missing": (edit_config(n_layer=3), "does not hold GPT-2 with n_layer=3: missing h.2.attn.c_attn.bias"),
    "extra layer": (edit_config(n_layer=1), "unexpected h.1.attn.c_attn.bias, h.1.attn.c_attn.weight"),
    "integer weight": (edit_weights(lambda sd: sd.update({"ln_f.bias": sd["ln_f.bias"].long()})),
                       "ln_f.bias is (32,) torch.int64"),
    "untied lm_head": (edit_weights(lambda sd: sd.update({"lm_head.weight": sd["wte.weight"] + 1})),
                       "lm_head.weight differs from wte.weight"),
    "tokenizer not JSON": (write("tokenizer.json", "{"), "tokenizer.json is not a tokenizer the tokenizers"),
    "tokenizer too large": (edit_config(vocab_size=299), "tokenizer.json: token ids reach 299, beyond"),
    "merges without vocab": (lambda d: (remove("tokenizer.json")(d), write("merges.txt", "#version: 0.2\n")(d)),
                             "has merges.txt but no vocab.json"),
    "damaged vocab": (lambda d: (remove("tokenizer.json")(d), write("merges.txt", "a b\n")(d),
                                 write("vocab.json", "{")(d)), "vocab.json + "),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_directory_is_one_line_naming_the_file(case, model_dirs, tmp_path):
    edit, expected = BAD[case]
    directory = tmp_path / "model"
    shutil.copytree(model_dirs["safetensors"], directory)
    edit(directory)
    with pytest.raises(ValueError) as info:
        gpt2.load(str(directory))
    message = str(info.value)
    assert expected in message and "\n" not in message, message
    assert str(directory) in message, message


def test_bad_bin_and_missing_directory(model_dirs, tmp_path):
    directory = tmp_path / "model"
    shutil.copytree(model_dirs["bin"], directory)
    (directory / "pytorch_model.bin").write_bytes((directory / "pytorch_model.bin").read_bytes()[:1000])
    with pytest.raises(ValueError, match="pytorch_model.bin cannot be loaded: it is not a whole torch.save file"):
        gpt2.load(str(directory))
    with pytest.raises(ValueError, match="nowhere is not a directory"):
        gpt2.load(str(tmp_path / "nowhere"))


# ----------------------------------------------------------------------------------------------
# train.py --init gpt2:DIR: the directory's shape, weights and tokenizer; the checkpoint keeps the tokenizer


@pytest.fixture(scope="module")
def code(tmp_path_factory):
    """About 60 kB of the lines the tokenizer was trained on, in a random order."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "code.txt"
    path.write_text("\n".join(rng.choice(LINES) for _ in range(3000)))
    return str(path)


def finetune_args(directory, code, out, *extra):
    return ["--init", f"gpt2:{directory}", "--data", code, "--batch-size", 8, "--eval-iters", 2, "--log-interval", 1,
            "--steps", 6, "--warmup-steps", 0, "--lr", 3e-3, "--dtype", "float64", "--out-dir", out, *extra]


def test_init_from_directory_trains_resumes_and_samples_with_its_tokenizer(model_dirs, code, tmp_path):
    """--init gpt2:DIR: the first loss is transformers' loss on the first batch of --data encoded by
    DIR's tokenizer (transformers' own); the run stops at step 3, DIR is removed, --resume finishes
    it as the straight run does; then --sample prints the greedy continuation through the tokenizer."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    directory = tmp_path / "gpt2"
    shutil.copytree(model_dirs["safetensors"], directory)
    tokenizer_json = (directory / "tokenizer.json").read_text()
    run(finetune_args(directory, code, tmp_path / "straight"))
    run(finetune_args(directory, code, tmp_path / "cut", "--stop-after", 3))

    ids = AutoTokenizer.from_pretrained(directory)(open(code).read())["input_ids"]
    x, y = train.get_batch(torch.tensor(ids[:int(len(ids) * 0.9)]), 8, 32, train.batch_seed(0, 1, "train"))
    hf = GPT2LMHeadModel.from_pretrained(directory, dtype=torch.float64, attn_implementation="eager")
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(hf(x).logits.flatten(0, 1), y.flatten()).item()
    straight = read_log(tmp_path / "straight")
    assert straight[1]["loss"] == pytest.approx(want, rel=1e-10)
    assert straight[6]["loss"] < straight[1]["loss"] - 0.5, (straight[1]["loss"], straight[6]["loss"])

    shutil.rmtree(directory)  # the checkpoint alone carries the tokenizer on
    assert "resuming from" in run([*finetune_args(directory, code, tmp_path / "cut"), "--resume"]).stdout
    resumed, ckpt = read_log(tmp_path / "cut"), load_ckpt(tmp_path / "cut")
    assert [resumed[s]["loss"] for s in (4, 5, 6)] == [straight[s]["loss"] for s in (4, 5, 6)]
    assert ckpt["tokenizer"] == tokenizer_json and ckpt["config"]["vocab_size"] == SHAPE["vocab_size"]

    prompt = "def main():"
    printed = run(["--sample", "--from", tmp_path / "cut", "--prompt", prompt, "--max-new-tokens", 12,
                   "--temperature", 0]).stdout
    reference = tokenizers.Tokenizer.from_str(tokenizer_json)
    idx = reference.encode(prompt).ids
    assert max(idx) >= 256  # merged tokens: bytes would be other ids
    model = nanosp.GPT(nanosp.GPTConfig(**{k: ckpt["config"][k] for k in train.SHAPE_KEYS})).eval()
    model.load_full_state_dict(ckpt["model"])
    with torch.no_grad():
        for _ in range(12):  # greedy, among the tokenizer's 300 ids
            idx.append(model(torch.tensor([idx]))[0][0, -1, :300].argmax().item())
    assert printed == reference.decode(idx, skip_special_tokens=False) + "\n"
    print(f"sample from the fine-tuned test model: {printed!r}")


def test_sample_from_a_model_directory_is_transformers_greedy(model_dirs):
    """--sample --from DIR reads the Hugging Face directory itself (float32); transformers' model on
    the same directory (float64) picks the same tokens, each ahead of the next by a clear margin."""
    from transformers import GPT2LMHeadModel

    directory, prompt, n = model_dirs["bin"], "import os, sys\nfor x", 16
    printed = run(["--sample", "--from", directory, "--prompt", prompt, "--max-new-tokens", n,
                   "--temperature", 0]).stdout
    tokenizer = gpt2.load(str(directory)).tokenizer
    hf = GPT2LMHeadModel.from_pretrained(directory, dtype=torch.float64, attn_implementation="eager").eval()
    idx = tokenizer.encode(prompt)
    with torch.no_grad():
        for _ in range(n):
            top = hf(torch.tensor([idx])).logits[0, -1, :tokenizer.vocab_size].topk(2)
            assert top.values[0] - top.values[1] > 1e-3  # float32 cannot pick another token
            idx.append(top.indices[0].item())
    assert printed == tokenizer.decode(idx) + "\n"
    print(f"sample from the test model directory: {printed!r}")


def test_init_from_a_torch_saved_state_dict(code, tmp_path):
    """gpt2:FILE, a torch.save of Hugging Face names, keeps working: bytes, the shape from the options;
    --stop-after 0 writes the starting weights as the checkpoint."""
    hf = {"transformer." + k: v for k, v in random_weights(vocab_size=50257).items()}
    torch.save({**hf, "lm_head.weight": hf["transformer.wte.weight"]}, tmp_path / "gpt2.pt")
    run(["--preset", "gpt2", "--n-layer", 2, "--n-head", 4, "--n-embd", 32, "--block-size", 32,
         "--init", f"gpt2:{tmp_path / 'gpt2.pt'}", "--data", code, "--batch-size", 8, "--eval-iters", 1,
         "--stop-after", 0, "--dtype", "float64", "--out-dir", tmp_path / "out"])
    ckpt = load_ckpt(tmp_path / "out")
    want = gpt2.hf_to_nanosp(hf, ckpt["config"], "hf")
    assert ckpt["tokenizer"] is None and ckpt["model"].keys() == want.keys()
    assert all(torch.equal(ckpt["model"][k], want[k]) for k in want)


def test_train_errors_with_model_directories(model_dirs, code, tmp_path):
    """One line each, exit code 2, before any work."""
    good, out = model_dirs["safetensors"], tmp_path / "out"
    base = ["--init", f"gpt2:{good}", "--data", code, "--out-dir", out]
    assert f"{good / 'config.json'} has n_embd=32, but n_embd=64 was given" in error_of([*base, "--n-embd", 64])
    assert "has bias=True, but bias=False was given" in error_of([*base, "--no-bias"])
    assert "has n_layer=2, but n_layer=4 was given" in error_of([*base, "--preset", "tiny"])
    assert "--seq-len 64" in error_of([*base, "--seq-len", 64])
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 100)
    assert "latin1.txt is not UTF-8 text (byte 3)" in error_of([*base[:2], "--data", tmp_path / "latin1.txt",
                                                                "--out-dir", out])
    assert "--init gpt2:: expected gpt2:DIR" in error_of(["--init", "gpt2:", "--out-dir", out])
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    write_config(bad, activation_function="gelu")
    assert f"--init gpt2:{bad}: {bad / 'config.json'}: activation_function='gelu'" in error_of(
        ["--init", f"gpt2:{bad}", "--data", code, "--out-dir", out])
    assert not out.exists()  # refused before any work

    (tmp_path / "empty").mkdir()
    says = error_of(["--sample", "--from", tmp_path / "empty"])
    assert "nor the config.json of a Hugging Face model directory" in says
    lowercase = tmp_path / "lowercase"
    shutil.copytree(good, lowercase)
    data = json.loads((lowercase / "tokenizer.json").read_text())
    (lowercase / "tokenizer.json").write_text(json.dumps({**data, "normalizer": {"type": "Lowercase"}}))
    assert "does not reproduce --prompt" in error_of(["--sample", "--from", lowercase, "--prompt", "Def"])


def test_checkpoint_with_a_bad_tokenizer_is_one_line(model_dirs, code, tmp_path):
    run(finetune_args(model_dirs["safetensors"], code, tmp_path, "--steps", 1))
    ckpt = load_ckpt(tmp_path)
    larger = tokenizers.Tokenizer.from_str(ckpt["tokenizer"])
    larger.add_tokens(["<a>", "<b>"])  # ids 300 and 301
    for tokenizer, says in [(5, "has a 'tokenizer' that is a int, not tokenizer.json text"),
                            ("{", f"the tokenizer in checkpoint {tmp_path / 'ckpt.pt'} is not a tokenizer"),
                            (larger.to_str(), "token ids reach 301, beyond the model's vocab_size=301")]:
        torch.save({**ckpt, "tokenizer": tokenizer}, tmp_path / "ckpt.pt")
        assert says in error_of(["--sample", "--from", tmp_path]), says
