import pytest
import torch
from torch import nn

from lightning_bn.errors import ConfigError
from lightning_bn.norm import NORMS, create_norm


def test_unknown_norm_lists_known_names():
    with pytest.raises(ValueError, match="norm='nope'.*batch.*none"):
        create_norm("nope", 4)


def test_wrong_kwarg_names_norm_and_argument():
    with pytest.raises(ConfigError, match="norm 'batch' has no argument 'p'"):
        create_norm("batch", 4, p=2)


@pytest.mark.parametrize("shape", [(8, 4), (8, 4, 5), (8, 4, 3, 3)])
def test_batch_norm_any_rank_matches_torch(shape):
    x = torch.randn(*shape)
    ours = create_norm("batch", 4)
    ref = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d}[len(shape)](4)
    torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.running_var, ref.running_var)
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x), ref(x))


def test_none_is_identity_and_every_norm_takes_num_features_first():
    x = torch.randn(3, 4)
    assert torch.equal(create_norm("none", 4)(x), x)
    for name in NORMS:
        create_norm(name, 4)
