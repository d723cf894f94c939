"""gpt2.py: a Hugging Face GPT-2 model directory, read into nanosp. Nothing here reaches a hub: the
directory is one that `hf download openai-community/gpt2 --local-dir gpt2` (or save_pretrained) left.

    pretrained = gpt2.load("gpt2")                    # config.json, the weights, the tokenizer
    model = nanosp.GPT(nanosp.GPTConfig(**pretrained.shape), group)
    model.load_full_state_dict(pretrained.state_dict)  # unsharded; each rank keeps its shard
    ids = pretrained.tokenizer.encode("def main():")   # GPT-2's token ids (no tokenizer files: None)

What to look for:
- config.json: of the keys GPT2LMHeadModel reads, five give nanosp's shape (n_layer, n_head,
  n_embd, n_positions -> block_size, vocab_size); the rest must say what nanosp computes anyway
  (LayerNorm eps 1e-5, GeLU with tanh, 4 n_embd hidden units, scores scaled by 1/sqrt(head size),
  the output head tied to the token embedding) or the directory is refused. The dropout
  probabilities are a training choice, not the model (train.py's --dropout); reorder_and_upcast_attn
  only reorders the same product and raises its precision under fp16, so it is accepted. Keys
  that do not reach GPT2LMHeadModel's logits (initializer_range, summary_*, n_ctx, token ids) are
  not read.
- weights: model.safetensors (or its shards), else pytorch_model.bin read with weights_only=True
  (load_torch_file, which reads train.py's checkpoints and --init files too).
  Conv1D stores (in, out) where nn.Linear has (out, in): transposed. Every entry is checked against
  the config's shape before any is used.
- tokenizer: tokenizer.json, else vocab.json + merges.txt built into GPT-2's byte-level BPE. Its
  JSON text (`Tokenizer.json`) is all it takes to rebuild it: train.py keeps it in checkpoints.
- anything missing, unreadable or inconsistent is a ValueError of one line naming the file.
"""
import json
import os
from dataclasses import dataclass
from typing import Optional

import safetensors.torch
import tokenizers
import torch
from tokenizers import decoders, pre_tokenizers


def one_line(error):
    return " ".join(str(error).split())


def read_json(path):
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not readable JSON: {one_line(e)}") from None


# ----------------------------------------------------------------------------------------------
# config.json -> nanosp's shape

# GPT2Config's defaults: transformers uses them for the keys a config.json leaves out
DEFAULTS = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
            "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "add_cross_attention": False, "tie_word_embeddings": True}
ALIASES = {"hidden_size": "n_embd", "max_position_embeddings": "n_positions",
           "num_attention_heads": "n_head", "num_hidden_layers": "n_layer"}
# 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), nanosp's F.gelu(approximate="tanh"), in three spellings
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_python_tanh")
FIXED = {  # key: (the value nanosp computes, why)
    "layer_norm_epsilon": (1e-5, "nanosp's LayerNorm eps is 1e-5"),
    "scale_attn_weights": (True, "nanosp scales attention scores by 1/sqrt(head size)"),
    "scale_attn_by_inverse_layer_idx": (False, "nanosp does not scale attention scores by 1/(layer + 1)"),
    "add_cross_attention": (False, "nanosp has no cross-attention"),
    "tie_word_embeddings": (True, "nanosp's output head is the token embedding"),
}


def read_config(directory):
    """config.json -> nanosp.GPTConfig's shape keys: n_layer, n_head, n_embd, block_size (GPT-2's
    n_positions), vocab_size, bias (GPT-2 always has biases)."""
    path = os.path.join(directory, "config.json")
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{path} holds a JSON {type(raw).__name__}, not an object of settings")
    if raw.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"{path}: model_type {raw['model_type']!r} is not GPT-2; nanosp reads 'gpt2' models")
    raw = dict(raw)
    for alias, key in ALIASES.items():
        if alias in raw:
            if key in raw and raw[key] != raw[alias]:
                raise ValueError(f"{path}: {alias}={raw[alias]!r} contradicts {key}={raw[key]!r}")
            raw[key] = raw.pop(alias)
    config = {**DEFAULTS, **raw}
    for key in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size"):
        if type(config[key]) is not int or config[key] < 1:
            raise ValueError(f"{path}: {key}={config[key]!r} must be a positive integer")
    C = config["n_embd"]
    if C % config["n_head"]:
        raise ValueError(f"{path}: n_embd={C} is not divisible by n_head={config['n_head']}")
    if config["n_inner"] is not None and config["n_inner"] != 4 * C:
        raise ValueError(f"{path}: n_inner={config['n_inner']!r}, but nanosp's MLP has 4 * n_embd = {4 * C} "
                         f"hidden units (n_inner null or {4 * C} would fit)")
    if config["activation_function"] not in TANH_GELUS:
        raise ValueError(f"{path}: activation_function={config['activation_function']!r} is not the GeLU with "
                         f"tanh that nanosp computes; one of {', '.join(TANH_GELUS)} would fit")
    for key, (want, why) in FIXED.items():
        if type(config[key]) is not type(want) or config[key] != want:
            raise ValueError(f"{path}: {key}={config[key]!r}, but {why} ({key}={json.dumps(want)} would fit)")
    return {"n_layer": config["n_layer"], "n_head": config["n_head"], "n_embd": C,
            "block_size": config["n_positions"], "vocab_size": config["vocab_size"], "bias": True}


# ----------------------------------------------------------------------------------------------
# weights -> nanosp's state dict

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")  # in the order transformers prefers them
BUFFERS = (".attn.bias", ".attn.masked_bias")  # the causal mask and its fill value, not weights
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def load_torch_file(path, name):
    """torch.load with weights_only=True (tensors and plain containers, never code). A file that
    cannot be loaded is one line with its `name`; torch.load's own message is about its internals."""
    if os.path.isdir(path):
        raise ValueError(f"{name} is a directory, not a file")
    if not os.path.isfile(path):
        raise ValueError(f"{name}: no such file")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{name} is empty")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a damaged file fails in a dozen ways (zip, pickle, struct, unicode, EOF)
        raise ValueError(f"{name} cannot be loaded: it is not a whole torch.save file of tensors "
                         f"(truncated, damaged, or holding objects that weights_only=True refuses)") from None


def is_tensor_dict(d):
    return isinstance(d, dict) and all(isinstance(k, str) and torch.is_tensor(v) for k, v in d.items())


def load_state_dict_file(path, name, what="state dict"):
    """A torch-saved {name: tensor} dict (load_torch_file, then its type checked)."""
    state_dict = load_torch_file(path, name)
    if not is_tensor_dict(state_dict):
        raise ValueError(f"{name} holds a {type(state_dict).__name__}, not a {{name: tensor}} {what}")
    return state_dict


def read_weight_file(path):
    if path.endswith(".safetensors"):
        if not os.path.isfile(path):
            raise ValueError(f"{path}: no such file")
        try:
            return safetensors.torch.load_file(path)
        except Exception as e:  # a damaged header or a truncated body
            raise ValueError(f"{path} cannot be read as safetensors: {one_line(e)}") from None
    return load_state_dict_file(path, path)


def read_weights(directory):
    """The first of WEIGHT_FILES in `directory`: (Hugging Face state dict, the path read).
    An *.index.json names the shard files holding each weight."""
    paths = [os.path.join(directory, name) for name in WEIGHT_FILES]
    path = next((p for p in paths if os.path.isfile(p)), None)
    if path is None:
        raise ValueError(f"{directory} has no weights: expected model.safetensors or pytorch_model.bin")
    if not path.endswith(".index.json"):
        return read_weight_file(path), path
    weight_map = read_json(path)
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{path} has no weight_map of {{weight name: shard file}}")
    state_dict = {}
    for shard in sorted(set(weight_map.values())):
        state_dict.update(read_weight_file(os.path.join(directory, shard)))
    return state_dict, path


def hf_shapes(shape):
    """{Hugging Face name (without 'transformer.'): shape} of GPT-2 with nanosp's `shape`.
    Conv1D weights are (in, out)."""
    C = shape["n_embd"]
    layer = {"ln_1.weight": (C,), "ln_1.bias": (C,), "attn.c_attn.weight": (C, 3 * C), "attn.c_attn.bias": (3 * C,),
             "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,), "ln_2.weight": (C,), "ln_2.bias": (C,),
             "mlp.c_fc.weight": (C, 4 * C), "mlp.c_fc.bias": (4 * C,), "mlp.c_proj.weight": (4 * C, C),
             "mlp.c_proj.bias": (C,)}
    shapes = {"wte.weight": (shape["vocab_size"], C), "wpe.weight": (shape["block_size"], C)}
    for i in range(shape["n_layer"]):
        shapes.update({f"h.{i}.{name}": s for name, s in layer.items()})
    return {**shapes, "ln_f.weight": (C,), "ln_f.bias": (C,)}


def hf_to_nanosp(hf_state_dict, shape, source):
    """A Hugging Face GPT-2 state dict -> nanosp's unsharded one, every entry checked against
    `shape` (n_layer, n_embd, vocab_size, block_size) first; errors name `source`.
    Names lose 'transformer.'; Conv1D weights are transposed to nn.Linear's (out, in); the mask
    buffers are dropped; lm_head.weight, tied to wte.weight, must equal it when it is there."""
    if shape.get("bias") is False:
        raise ValueError(f"{source}: GPT-2 has biases, but the model was given none (bias=False)")
    weights = {}
    for key, value in hf_state_dict.items():
        key = key.removeprefix("transformer.")
        if not key.endswith(BUFFERS):
            weights[key] = value
    head = weights.pop("lm_head.weight", None)
    want = hf_shapes(shape)
    missing, unexpected = sorted(want.keys() - weights.keys()), sorted(weights.keys() - want.keys())
    if missing or unexpected:
        listed = lambda keys: ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
        parts = ([f"missing {listed(missing)}"] if missing else []) + (
            [f"unexpected {listed(unexpected)}"] if unexpected else [])
        raise ValueError(f"{source} does not hold GPT-2 with n_layer={shape['n_layer']}: {'; '.join(parts)}")
    sized_by = {"wte.weight": ("vocab_size", "n_embd"), "wpe.weight": ("block_size", "n_embd")}
    for key, size in want.items():
        value = weights[key]
        if not value.is_floating_point() or tuple(value.shape) != size:
            given = sized_by.get(key, ("n_embd",))
            raise ValueError(f"{source}: {key} is {tuple(value.shape)} {value.dtype}, but with "
                             f"{', '.join(f'{k}={shape[k]}' for k in given)} it must be a floating {size}")
    if head is not None and not torch.equal(head, weights["wte.weight"]):
        raise ValueError(f"{source}: lm_head.weight differs from wte.weight; nanosp's output head is the "
                         f"token embedding (tied, as GPT-2's)")
    return {key: value.t().contiguous() if key.endswith(CONV1D) else value for key, value in weights.items()}


# ----------------------------------------------------------------------------------------------
# the tokenizer


class Tokenizer:
    """Text <-> token ids with the `tokenizers` library. `json` is the whole tokenizer as
    tokenizer.json text: Tokenizer(tokenizer.json) rebuilds it, wherever the directory went."""

    def __init__(self, json_text, source="tokenizer"):
        try:
            self.backend = tokenizers.Tokenizer.from_str(json_text)
        except Exception as e:  # the library's parse errors have no common type
            raise ValueError(f"{source} is not a tokenizer the tokenizers library reads: {one_line(e)}") from None
        ids = self.backend.get_vocab(with_added_tokens=True).values()
        if not ids:
            raise ValueError(f"{source} has an empty vocabulary")
        self.json, self.source = json_text, source
        self.vocab_size = max(ids) + 1  # the ids it can produce are < vocab_size

    def encode(self, text, what="the text"):
        """The token ids of `text`, checked to decode back to `text` exactly: a tokenizer that
        normalises or drops characters would train on, or continue, another text than the one given."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        back = self.decode(ids)
        if back != text:
            at = next((i for i, (a, b) in enumerate(zip(text, back)) if a != b), min(len(text), len(back)))
            raise ValueError(f"{self.source} does not reproduce {what}: decoding its tokens differs at character "
                             f"{at} ({text[at:at + 12]!r} comes back as {back[at:at + 12]!r})")
        return ids

    def decode(self, ids):
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def check_fits(self, vocab_size, whose):
        """Every id it produces is a row of `whose` embedding of vocab_size rows."""
        if self.vocab_size > vocab_size:
            raise ValueError(f"{self.source}: token ids reach {self.vocab_size - 1}, beyond {whose} "
                             f"vocab_size={vocab_size}")


def read_tokenizer(directory):
    """tokenizer.json, else vocab.json + merges.txt as GPT-2's byte-level BPE (what transformers'
    GPT2Tokenizer builds from them, <|endoftext|> special); None when there is neither."""
    path = os.path.join(directory, "tokenizer.json")
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                return Tokenizer(f.read(), path)
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} cannot be read: {one_line(e)}") from None
    vocab, merges = os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")
    if not os.path.isfile(vocab) and not os.path.isfile(merges):
        return None
    if not (os.path.isfile(vocab) and os.path.isfile(merges)):
        have, lack = (vocab, merges) if os.path.isfile(vocab) else (merges, vocab)
        raise ValueError(f"{directory} has {os.path.basename(have)} but no {os.path.basename(lack)}: "
                         f"GPT-2's tokenizer needs both (or a tokenizer.json)")
    try:
        backend = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(vocab, merges))
    except Exception as e:  # the library's parse errors have no common type
        raise ValueError(f"{vocab} + {merges} are not a BPE vocabulary and its merges: {one_line(e)}") from None
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    if "<|endoftext|>" in backend.get_vocab():
        backend.add_special_tokens(["<|endoftext|>"])
    return Tokenizer(backend.to_str(), f"{vocab} + {merges}")


# ----------------------------------------------------------------------------------------------
# the whole directory


@dataclass
class Pretrained:
    path: str
    shape: dict  # nanosp.GPTConfig's shape keys, from config.json
    state_dict: dict  # unsharded, in nanosp's names
    tokenizer: Optional[Tokenizer]  # None: the directory has no tokenizer files


def load(directory):
    """Read a Hugging Face GPT-2 model directory: config.json, the weights, the tokenizer if any.
    The cheap checks (config, tokenizer) come before the weights are read."""
    if not os.path.isdir(directory):
        raise ValueError(f"{directory} is not a directory; a Hugging Face GPT-2 model directory holds "
                         f"config.json and model.safetensors (or pytorch_model.bin)")
    shape = read_config(directory)
    tokenizer = read_tokenizer(directory)
    if tokenizer is not None:
        tokenizer.check_fits(shape["vocab_size"], f"{os.path.join(directory, 'config.json')}'s")
    hf_state_dict, path = read_weights(directory)
    return Pretrained(directory, shape, hf_to_nanosp(hf_state_dict, shape, path), tokenizer)
