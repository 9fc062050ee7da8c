import pytest


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
