"""First start: the demo model is trained and registered once, and the prompt pool is filled, so chat works."""

from app import migrate
from app.db import make_engine, make_session_factory
from app.jobs.bootstrap import bootstrap_demo_model, seed_demo_prompts
from app.models import ModelKind, Prompt, PromptSource
from app.services.model_versions import served_version
from app.settings import Settings
from ml.checkpoint import load_checkpoint
from ml.tokenizer import Tokenizer


def test_bootstrap_trains_registers_and_is_done_once(settings: Settings) -> None:
    migrate.upgrade(settings.resolved_database_url)
    assert bootstrap_demo_model(settings, pretrain_steps=6, sft_steps=4, demo_docs=300, n_layer=2, n_embd=32)
    factory = make_session_factory(make_engine(settings.resolved_database_url))
    with factory() as session:
        served = served_version(session)
        assert served.kind == ModelKind.sft and served.parent_id is not None
        assert served.metrics["val_loss"] > 0
    model, _ = load_checkpoint(served.path)
    tokenizer = Tokenizer.load(served.path)
    assert model.config.vocab_size >= tokenizer.vocab_size
    assert (model.config.n_layer, model.config.n_embd) == (2, 32)  # the sizes asked for, not the defaults
    assert not bootstrap_demo_model(settings)  # a model is served now: nothing to do

    added = seed_demo_prompts(settings)
    assert added > 100 and seed_demo_prompts(settings) == 0
    with factory() as session:
        splits = {p.split.value for p in session.query(Prompt).filter_by(source=PromptSource.demo)}
        assert splits == {"train", "heldout"}
