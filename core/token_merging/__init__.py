"""Token merging in the image tower: ToMe (bipartite soft matching with proportional attention,
Bolya et al. 2023) and PiToMe (energy-score protection of informative tokens, Tran et al. 2024).

``apply_token_merging(backbone, TokenMergingConfig(algorithm="tome", r=8))`` makes every image
encode merge ``r`` tokens per block; the feature cache keys features by the setting, recipes set
it with ``token_merging:``, the zero-shot API with ``token_merging=``. See docs/zeroshot.md.
"""
from .blocks import BLOCK_FAMILIES, BlockFamily, family_of, register_block_family
from .config import ALGORITHMS, TokenMergingConfig
from .matching import pitome_matching, tome_matching
from .patch import (TowerMerging, apply_token_merging, merging_config, merging_of, prefix_tokens, refuse_unmergeable,
                    remove_token_merging, token_merging, token_merging_key)

__all__ = ["ALGORITHMS", "BLOCK_FAMILIES", "BlockFamily", "TokenMergingConfig", "TowerMerging", "apply_token_merging",
           "family_of", "merging_config", "merging_of", "pitome_matching", "prefix_tokens", "refuse_unmergeable",
           "register_block_family", "remove_token_merging", "tome_matching", "token_merging", "token_merging_key"]
