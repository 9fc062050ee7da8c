import os

import pytest

# decode="fused" is Triton: on a machine without a GPU its kernels run in Triton's interpreter
# (tests/test_decode_kernels.py). The variable must be set before the kernels are defined.
if "TRITON_INTERPRET" not in os.environ:
    import torch
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A 512-token BPE trained on a slice of the bundled corpus (~0.3 s), saved and loaded back.
    Its files are in `tok.directory` (a `tokenizer` folder: point NANOCHAT_BASE_DIR at its parent)."""
    from nanochat.dataset import load_bundled
    from nanochat.tokenizer import Tokenizer
    docs = [d["text"] for d in load_bundled()["train"][:30]]
    directory = tmp_path_factory.mktemp("nanochat_base") / "tokenizer"
    Tokenizer.train_from_iterator(iter(docs), 512).save(str(directory))
    return Tokenizer.from_directory(str(directory))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: a second intra-op thread buys nothing and, on a loaded 2-core box, costs 3-20x.
    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_mc_model(tokenizer):
    """A 1-layer MegaContext GPT with decisive logits (greedy decoding has no near-ties): the
    model behind the chat server tests."""
    import torch
    from nanochat.gpt import GPT, GPTConfig
    cfg = GPTConfig(sequence_len=256, vocab_size=tokenizer.get_vocab_size(), n_layer=1, n_head=1, n_kv_head=1,
                    n_embd=64, megacontext=True, mc_block_size=8, mc_max_level=3, gist_layers=1, lens_layers=1)
    torch.manual_seed(0)
    model = GPT(cfg)
    model.init_weights()
    torch.nn.init.normal_(model.lm_head.weight, std=0.5)
    return model
