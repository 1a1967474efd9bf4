"""RowSparseAdamW, the optimizer of the embedding tables with sparse_table_updates: it
updates only the rows a step looked up, and is otherwise AdamW (the reference here is
torch.optim.AdamW's single-tensor step)."""

import pytest
import torch

from tests.conftest import make_tiny_config
from tests.test_trainer import checkpoint_path, real_trainer, record_every_step
from trainer import RowSparseAdamW, build_optimizers, gradient_norm

BETAS, EPS = (0.9, 0.99), 1e-8


def twin_tables(rows=12, width=4, seed=0):
    """Two embedding modules with the same random weights."""
    torch.manual_seed(seed)
    a = torch.nn.Embedding(rows, width)
    b = torch.nn.Embedding(rows, width)
    b.load_state_dict(a.state_dict())
    return a, b


def looked_up_loss(table, indices, seed):
    """A loss whose gradient reaches exactly the rows `indices` of `table`. It is linear
    in the rows, so its gradient does not depend on the weights: a row read before its
    owed decay is caught up (at its next update) gets the gradient dense AdamW's does."""
    target = torch.randn(len(indices), table.embedding_dim,
                         generator=torch.Generator().manual_seed(seed))
    return (table(torch.tensor(indices)) * target).sum()


def test_one_step_equals_adamw_on_the_rows_used_and_leaves_the_others():
    sparse_table, dense_table = twin_tables()
    sparse = RowSparseAdamW([sparse_table], lr=0.1, betas=BETAS, eps=EPS, weight_decay=0.0)
    dense = torch.optim.AdamW(dense_table.parameters(), lr=0.1, betas=BETAS, eps=EPS,
                              weight_decay=0.0, foreach=False)
    before = sparse_table.weight.detach().clone()
    used = [1, 4, 4, 7]  # a row twice: its gradients add up
    for table, optimizer in ((sparse_table, sparse), (dense_table, dense)):
        looked_up_loss(table, used, seed=1).backward()
        optimizer.step()
    rows = torch.tensor([1, 4, 7])
    assert torch.equal(sparse_table.weight[rows], dense_table.weight[rows])
    others = torch.tensor([i for i in range(12) if i not in (1, 4, 7)])
    assert torch.equal(sparse_table.weight[others], before[others])
    assert not torch.equal(sparse_table.weight[rows], before[rows])  # it did move them


def test_a_skipped_row_catches_up_its_moments_and_decay_as_adamw_would():
    """With beta1 = 0, dense AdamW moves a row whose gradient is zero by its weight decay
    alone, and decays its second moment: what the catch-up replays when the row is next
    updated, under a rate that changes every step."""
    sparse_table, dense_table = twin_tables()
    options = dict(betas=(0.0, 0.99), eps=EPS, weight_decay=0.5)
    sparse = RowSparseAdamW([sparse_table], lr=0.1, **options)
    dense = torch.optim.AdamW(dense_table.parameters(), lr=0.1, foreach=False, **options)
    schedule = [[0, 1, 2], [0], [0, 3], [0], [0], [0, 1, 2, 3]]  # rows 1-3 skip steps
    for step, used in enumerate(schedule):
        for table, optimizer in ((sparse_table, sparse), (dense_table, dense)):
            optimizer.param_groups[0]["lr"] = 0.1 / (1 + step)
            optimizer.zero_grad()
            looked_up_loss(table, used, seed=step).backward()
            optimizer.step()
    rows = torch.arange(4)
    torch.testing.assert_close(sparse_table.weight[rows], dense_table.weight[rows],
                               rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(sparse.state[sparse_table.weight]["exp_avg_sq"][rows],
                               dense.state[dense_table.weight]["exp_avg_sq"][rows],
                               rtol=1e-6, atol=1e-12)
    # Rows never used stand still; dense AdamW decays them. The catch-up happens at the
    # row's next update, so this is where the two differ.
    assert not torch.allclose(sparse_table.weight[5:], dense_table.weight[5:])


def test_a_skipped_row_also_coasts_on_its_momentum_as_adamw_would():
    """With momentum, dense AdamW keeps moving a row whose gradient is zero; the catch-up
    adds those moves in closed form (coasting). After the bias corrections have settled
    and at a constant rate it is exact, up to float rounding; the rows compared are those
    the last step used (a row skipped at the end still owes its catch-up)."""
    sparse_table, dense_table = twin_tables(rows=12, width=64)
    options = dict(betas=(0.9, 0.9), eps=EPS, weight_decay=0.1)
    sparse = RowSparseAdamW([sparse_table], lr=0.01, **options)
    dense = torch.optim.AdamW(dense_table.parameters(), lr=0.01, foreach=False, **options)
    schedule = [range(12)] * 100 + [[0, 1, 2], [0], [0, 3], [0], [0], [0, 1, 2, 3]] + \
        [[0]] * 8 + [[1, 2, 3, 4, 5]]  # rows 1-5 skip up to 13 steps
    for step, used in enumerate(schedule):
        for table, optimizer in ((sparse_table, sparse), (dense_table, dense)):
            optimizer.zero_grad()
            looked_up_loss(table, list(used), seed=step).backward()
            optimizer.step()
    rows = torch.arange(1, 6)
    torch.testing.assert_close(sparse_table.weight[rows], dense_table.weight[rows],
                               rtol=1e-5, atol=1e-5)
    # Without the coasting the skipped rows would stand far from dense AdamW's.
    assert (sparse_table.weight[0] - dense_table.weight[0]).abs().max() > 1e-3


def test_the_rows_are_those_of_training_forwards_and_zero_grad_forgets_them():
    table, _ = twin_tables()
    optimizer = RowSparseAdamW([table], lr=0.1, betas=BETAS, eps=EPS, weight_decay=0.0)
    with torch.no_grad():
        table(torch.tensor([9]))  # validation or sampling: no gradient, not recorded
    looked_up_loss(table, [2, 3], seed=0).backward()
    assert torch.equal(optimizer.used_rows([table.weight])[0], torch.tensor([2, 3]))
    optimizer.zero_grad()
    assert not optimizer.looked_up
    # Without a record (hooks left out), the rows are read from the gradient.
    looked_up_loss(table, [5], seed=0).backward()
    optimizer.looked_up.clear()
    assert torch.equal(optimizer.used_rows([table.weight])[0], torch.tensor([5]))


def test_the_real_model_updates_exactly_the_rows_whose_gradient_is_not_zero(tmp_path):
    """Every table row the model reaches is reached through its module's forward: the
    recorded rows are the rows with a gradient (weight tying would break this)."""
    trainer = real_trainer(tmp_path, sparse_table_updates=True)
    sparse = trainer.optimizers[-1]
    assert isinstance(sparse, RowSparseAdamW)
    x, y = trainer.train_dataset.__getitems__(range(4))
    trainer.model(x, y).backward()
    tables = [group_param for group in sparse.param_groups for group_param in group["params"]]
    assert len(tables) == len(trainer.config["ngram_orders"])  # the n-gram tables
    for param, rows in zip(tables, sparse.used_rows(tables)):
        assert torch.equal(rows, param.grad.abs().amax(dim=1).nonzero().squeeze(1))


def test_the_tables_leave_adamw_and_the_layers_stay_with_muon(tmp_path):
    trainer = real_trainer(tmp_path, optimizer_type="Muon", sparse_table_updates=True)
    adamw, muon, sparse = trainer.optimizers
    model = trainer.raw_model
    in_sparse = {id(p) for group in sparse.param_groups for p in group["params"]}
    assert in_sparse == {id(p) for p in model.ngram_embedding.parameters()}
    in_adamw = {id(p) for group in adamw.param_groups for p in group["params"]}
    in_muon = {id(p) for group in muon.param_groups for p in group["params"]}
    assert in_muon == {id(p) for p in model.hidden_matrices()}
    assert in_adamw | in_muon | in_sparse == {id(p) for p in model.parameters()}
    assert len(in_adamw) + len(in_muon) + len(in_sparse) == len(list(model.parameters()))
    # Adam's decay is in the gradient, not decoupled: its tables stay dense.
    config = make_tiny_config(str(tmp_path), optimizer_type="Adam", sparse_table_updates=True)
    assert len(build_optimizers(model, config)) == 1


def test_clipping_sees_the_same_gradient_norm_with_and_without(tmp_path):
    norms = []
    for sparse in (False, True):
        trainer = real_trainer(tmp_path / str(sparse), sparse_table_updates=sparse)
        x, y = trainer.train_dataset.__getitems__(range(4))
        trainer.model(x, y).backward()
        norms.append(gradient_norm(trainer.raw_model))
    assert norms[0] == norms[1] and norms[0] > 0


@pytest.mark.parametrize("optimizer_type", ["AdamW", "Muon"])
def test_exact_resume_with_sparse_table_updates(tmp_path, optimizer_type):
    recipe = dict(optimizer_type=optimizer_type, sparse_table_updates=True, max_steps=12,
                  gradient_accumulation_steps=2, num_epochs=1, weight_decay=0.1,
                  validate_and_checkpoint_best_every_batches=4)
    straight = real_trainer(tmp_path / "a", **recipe)
    straight.train()
    first = real_trainer(tmp_path / "b", **recipe)
    record_every_step(first, stop_at=7)  # interrupted, as by Ctrl-C: the same horizon
    assert first.train()["interrupted"]
    resumed = real_trainer(tmp_path / "b", **recipe)
    resumed.resume(checkpoint_path(resumed.config, "latest"))
    state = resumed.optimizers[-1].state[resumed.raw_model.ngram_embedding.embeddings[0].weight]
    assert state["last_step"].dtype == torch.int64 and state["decay_mark"].dtype == torch.float64
    resumed.train()
    a, b = straight.raw_model.state_dict(), resumed.raw_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    sparse_a, sparse_b = (t.optimizers[-1].state_dict()["state"] for t in (straight, resumed))
    for index, state in sparse_a.items():
        for key, value in state.items():
            same = torch.equal if torch.is_tensor(value) else (lambda u, v: u == v)
            assert same(value, sparse_b[index][key]), key


def test_a_resume_that_turns_sparse_table_updates_on_says_what_changed(tmp_path):
    first = real_trainer(tmp_path, max_steps=2, optimizer_type="AdamW")
    first.train()
    turned_on = real_trainer(tmp_path, max_steps=3, optimizer_type="AdamW",
                             sparse_table_updates=True)
    with pytest.raises(Exception, match="sparse_table_updates changed"):
        turned_on.resume(checkpoint_path(first.config, "latest"))


def test_settings_the_closed_forms_cannot_follow_are_config_errors():
    from main import check_config
    from utils import ConfigError
    config = make_tiny_config("/unused", sparse_table_updates=True, learning_rate=0.5,
                              weight_decay=2.0, lr_scheduler_eta_min=1e-4)
    with pytest.raises(ConfigError) as caught:
        check_config(config)
    assert any("`learning_rate` x `weight_decay` (0.5 x 2.0) is 1 or more" in problem
               for problem in caught.value.problems)
    check_config(dict(config, weight_decay=1.9))  # below 1: accepted
    check_config(dict(config, sparse_table_updates=False))  # dense AdamW: not its rule
    with pytest.raises(ConfigError, match="`adam_beta1` \\(0.9\\) is not below the square root"):
        check_config(dict(config, weight_decay=0.1, adam_beta2=0.8))


def test_fp16_with_a_grad_scaler_steps_the_tables(tmp_path):
    trainer = real_trainer(tmp_path, sparse_table_updates=True, use_amp=True,
                           amp_dtype="float16", max_steps=3)
    assert trainer.scaler.is_enabled()
    table = trainer.raw_model.ngram_embedding.embeddings[0].weight
    assert not table.any()  # the tables start at zero
    trainer.train()
    assert table.any() and torch.isfinite(table).all()
    assert trainer.optimizers[-1].state[table]["step"] >= 1  # a step the scaler took


def test_a_model_without_sparse_tables_trains_with_the_option_on(tmp_path):
    from tests.test_trainer import make_trainer, tiny
    trainer = make_trainer(tiny(tmp_path, sparse_table_updates=True))
    assert len(trainer.optimizers) == 1  # the stand-in model declares no sparse tables
    assert trainer.train()["steps"] == 6
