"""Compare two train_gpt artifacts tensor by tensor (bench/same_behaviour.sh): prints one key:value line.
usage: python3 bench/compare_artifacts.py A.ptz B.ptz [CHECKOUT whose train_gpt.py reads them]"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, sys.argv[3] if len(sys.argv) > 3 else str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

(ta, ma), (tb, mb) = (tg.deserialize_state(Path(p).read_bytes()) for p in sys.argv[1:3])
differ = sorted(set(ta) ^ set(tb)) + [k for k in ta if k in tb and not torch.equal(ta[k], tb[k])]
ca, cb = ma.pop("model_config", {}), mb.pop("model_config", {})
config = sorted(k for k in set(ca) | set(cb) if ca.get(k) != cb.get(k))
print(f"tensors:{len(ta)} same_tensors:{int(not differ)} same_meta:{int(ma == mb)} differ:{','.join(differ[:5]) or 'none'} "
      f"config_keys_changed:{','.join(config) or 'none'}")
