"""Statistics for record submissions: mean / sample std, Student t distribution and a
one-sided Welch t-test of "our seeds beat the reference by more than a margin".

Pure Python (math only), no scipy.

Units
-----
The challenge threshold is an improvement of at least 0.005 *nats* of val_loss per token.

    bits  = nats / ln 2
    val_bpb = val_loss / ln 2 * tokens / bytes          (val_loss in nats per token)
    =>  delta_nats = delta_bpb * ln 2 * bytes / tokens
        delta_bpb  = delta_nats / ln 2 * tokens / bytes

`bytes/tokens` is the byte count per token of the validation set that was scored
(val_bytes / val_tokens in summary.json).  When it is unknown it follows from a pair of
metrics measured on the same tokens: bytes/tokens = val_loss / (val_bpb * ln 2).
Example: 1.2244 BPB <-> 2.0727 nats (sp1024) gives 0.005 nats = 0.00295 BPB;
1.06108 BPB <-> 2.32203 nats (sp8192) gives 0.005 nats = 0.00228 BPB.

Test
----
Lower is better.  improvement = ref_mean - our_mean (in nats).  H0: improvement <= margin,
H1: improvement > margin (margin = 0.005 nats by default).

    se  = sqrt(s1^2/n1 + s2^2/n2)
    t   = (improvement - margin) / se
    df  = se^4 / ((s1^2/n1)^2/(n1-1) + (s2^2/n2)^2/(n2-1))      (Welch-Satterthwaite)
    p   = P(T_df >= t)

A reference given as a single exact number (n=1, std=0) contributes nothing to se or df.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, asdict
from typing import Iterable, Optional, Sequence

LN2 = math.log(2.0)
THRESHOLD_NATS = 0.005


class StatsError(ValueError):
    pass


# ---------------------------------------------------------------- descriptive statistics
def mean(xs: Sequence[float]) -> float:
    xs = [float(x) for x in xs]
    if not xs:
        raise StatsError("mean of empty sequence")
    return math.fsum(xs) / len(xs)


def sample_std(xs: Sequence[float]) -> float:
    """Sample standard deviation (n-1 denominator). 0.0 for a single value."""
    xs = [float(x) for x in xs]
    if not xs:
        raise StatsError("std of empty sequence")
    if len(xs) == 1:
        return 0.0
    m = mean(xs)
    return math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (len(xs) - 1))


# ---------------------------------------------------------------- special functions
def _betacf(a: float, b: float, x: float, max_iter: int = 10000, eps: float = 1e-15) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz method)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = 1.0
    d = 1.0 - qab * x / qap
    if abs(d) < tiny:
        d = tiny
    d = 1.0 / d
    h = d
    for m in range(1, max_iter + 1):
        m2 = 2 * m
        # even step
        num = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + num * d
        d = tiny if abs(d) < tiny else d
        c = 1.0 + num / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        h *= d * c
        # odd step
        num = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + num * d
        d = tiny if abs(d) < tiny else d
        c = 1.0 + num / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        step = d * c
        h *= step
        if abs(step - 1.0) < eps:
            return h
    raise StatsError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def betainc(a: float, b: float, x: float, y: Optional[float] = None) -> float:
    """Regularized incomplete beta function I_x(a, b) for a, b > 0, 0 <= x <= 1.

    y = 1 - x may be passed when it is known more precisely than 1 - x in floating point.
    """
    if a <= 0 or b <= 0:
        raise StatsError("betainc needs a > 0 and b > 0")
    if y is None:
        y = 1.0 - x
    if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
        raise StatsError("betainc needs 0 <= x <= 1")
    if x == 0.0:
        return 0.0
    if y == 0.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log(y))
    front = math.exp(log_front)
    # the continued fraction converges fast for x < (a+1)/(a+b+2); use symmetry otherwise
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, y) / b


def _normal_sf(t: float) -> float:
    return 0.5 * math.erfc(t / math.sqrt(2.0))


def t_sf(t: float, df: float) -> float:
    """Survival function P(T > t) of Student's t with df degrees of freedom (df may be inf)."""
    if math.isnan(t) or math.isnan(df):
        return math.nan
    if df <= 0:
        raise StatsError("df must be > 0")
    if t == math.inf:
        return 0.0
    if t == -math.inf:
        return 1.0
    if math.isinf(df):
        return _normal_sf(t)
    t2 = t * t
    # P(T > |t|) = I_x(df/2, 1/2) / 2 with x = df/(df+t^2); pass 1-x exactly for precision
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t2), t2 / (df + t2))
    return tail if t > 0 else 1.0 - tail


def t_cdf(t: float, df: float) -> float:
    """CDF P(T <= t) of Student's t."""
    return 1.0 - t_sf(t, df) if t > 0 else t_sf(-t, df)


# ---------------------------------------------------------------- unit conversion
def bytes_per_token(val_tokens: Optional[float] = None, val_bytes: Optional[float] = None,
                    val_loss: Optional[float] = None, val_bpb: Optional[float] = None) -> float:
    """bytes/tokens of the scored set: from counts if given, else from a (loss, bpb) pair."""
    if val_tokens and val_bytes:
        return float(val_bytes) / float(val_tokens)
    if val_loss and val_bpb:
        return float(val_loss) / (float(val_bpb) * LN2)
    raise StatsError("need val_tokens/val_bytes or a val_loss/val_bpb pair to convert BPB <-> nats")


def bpb_to_nats(bpb: float, bytes_per_tok: float) -> float:
    """BPB (bits per byte) -> nats per token: bpb * ln2 * bytes/tokens."""
    return bpb * LN2 * bytes_per_tok


def nats_to_bpb(nats: float, bytes_per_tok: float) -> float:
    """nats per token -> BPB: nats / ln2 * tokens/bytes."""
    return nats / LN2 / bytes_per_tok


# ---------------------------------------------------------------- Welch test
@dataclass
class WelchResult:
    our_mean: float
    our_std: float
    our_n: int
    ref_mean: float
    ref_std: float
    ref_n: int
    improvement: float  # ref_mean - our_mean (same unit as inputs; positive = we are better)
    margin: float
    t_statistic: float
    welch_df: float
    p_value: float

    def to_dict(self) -> dict:
        return asdict(self)


def welch_df(var1: float, n1: int, var2: float, n2: int) -> float:
    """Welch-Satterthwaite degrees of freedom; terms with zero variance contribute nothing."""
    v1 = var1 / n1
    v2 = var2 / n2
    den = 0.0
    if v1 > 0:
        if n1 < 2:
            raise StatsError("a sample with variance needs n >= 2")
        den += v1 * v1 / (n1 - 1)
    if v2 > 0:
        if n2 < 2:
            raise StatsError("a sample with variance needs n >= 2")
        den += v2 * v2 / (n2 - 1)
    if den == 0.0:
        return math.inf
    return (v1 + v2) ** 2 / den


def welch_one_sided(our_values: Sequence[float], ref_mean: float, ref_std: float, ref_n: int,
                    margin: float = 0.0) -> WelchResult:
    """One-sided Welch test, lower is better. H0: ref_mean - our_mean <= margin."""
    our_values = [float(v) for v in our_values]
    n1 = len(our_values)
    if n1 < 2:
        raise StatsError("need at least 2 seeds of our own for a t-test")
    ref_n = int(ref_n)
    if ref_n < 1:
        raise StatsError("ref_n must be >= 1")
    ref_std = float(ref_std or 0.0)
    if ref_std < 0:
        raise StatsError("ref_std must be >= 0")
    if ref_n == 1 and ref_std > 0:
        raise StatsError("a reference with n=1 cannot have a std (give n >= 2 or std 0)")
    m1 = mean(our_values)
    s1 = sample_std(our_values)
    improvement = float(ref_mean) - m1
    se = math.sqrt(s1 * s1 / n1 + ref_std * ref_std / ref_n)
    df = welch_df(s1 * s1, n1, ref_std * ref_std, ref_n)
    diff = improvement - margin
    if se == 0.0:
        t = math.inf if diff > 0 else (-math.inf if diff < 0 else 0.0)
        p = 0.0 if diff > 0 else 1.0
    else:
        t = diff / se
        p = t_sf(t, df)
    return WelchResult(our_mean=m1, our_std=s1, our_n=n1, ref_mean=float(ref_mean),
                       ref_std=ref_std, ref_n=ref_n, improvement=improvement, margin=margin,
                       t_statistic=t, welch_df=df, p_value=p)


def compare_bpb(our_bpb: Sequence[float], ref_mean_bpb: float, ref_std_bpb: float, ref_n: int,
                bytes_per_tok: float, threshold_nats: float = THRESHOLD_NATS) -> dict:
    """Test our per-seed BPB against a BPB reference with a threshold in nats per token.

    All values are scaled to nats per token (x * ln2 * bytes/tokens) before the test, which is
    the same as testing in BPB against threshold_nats / ln2 * tokens/bytes.
    """
    k = LN2 * bytes_per_tok
    res = welch_one_sided([v * k for v in our_bpb], ref_mean_bpb * k, ref_std_bpb * k, ref_n,
                          margin=threshold_nats)
    delta_bpb = mean(our_bpb) - ref_mean_bpb
    return dict(
        unit="bpb",
        bytes_per_token=bytes_per_tok,
        threshold_nats=threshold_nats,
        threshold_bpb=nats_to_bpb(threshold_nats, bytes_per_tok),
        delta_vs_reference_bpb=delta_bpb,
        delta_vs_reference_nats=bpb_to_nats(delta_bpb, bytes_per_tok),
        t_statistic=res.t_statistic,
        welch_df=res.welch_df,
        p_value=res.p_value,
    )


def compare_loss(our_loss: Sequence[float], ref_mean_loss: float, ref_std_loss: float, ref_n: int,
                 bytes_per_tok: Optional[float] = None,
                 threshold_nats: float = THRESHOLD_NATS) -> dict:
    """Same test directly in val_loss (nats per token)."""
    res = welch_one_sided(our_loss, ref_mean_loss, ref_std_loss, ref_n, margin=threshold_nats)
    delta_nats = mean(our_loss) - ref_mean_loss
    return dict(
        unit="loss",
        bytes_per_token=bytes_per_tok,
        threshold_nats=threshold_nats,
        threshold_bpb=nats_to_bpb(threshold_nats, bytes_per_tok) if bytes_per_tok else None,
        delta_vs_reference_bpb=nats_to_bpb(delta_nats, bytes_per_tok) if bytes_per_tok else None,
        delta_vs_reference_nats=delta_nats,
        t_statistic=res.t_statistic,
        welch_df=res.welch_df,
        p_value=res.p_value,
    )


def describe(values: Iterable[float]) -> tuple[float, float, int]:
    values = list(values)
    return mean(values), sample_std(values), len(values)
