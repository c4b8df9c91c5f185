"""Every numeric constant of the upstream math, named once (float32 semantics throughout).

Values and where upstream uses them (google/learned_optimization, ``common.py`` and
``adafac_mlp_lopt.py``):

==========================  ======  ===========================================================
name                        value   use
==========================  ======  ===========================================================
FACTORED_GRAD_SQ_EPS        1e-30   ``g*g + eps`` inside the factored accumulators
SAFE_RSQRT_FLOOR            1e-9    ``safe_rsqrt(x) = rsqrt(max(x, 1e-9))``
ROW_COL_MEAN_EPS            1e-9    ``v_row / (mean(v_row) + 1e-9)``
DIAG_PRECOND_EPS            1e-9    non-factored ``fac_g = g * safe_rsqrt(v + 1e-9)``
ROW_COL_FEATURE_EPS         1e-8    ``rsqrt(row_feat + 1e-8)``, ``rsqrt(col_feat + 1e-8)``
RMS_FEATURE_EPS             1e-6    ``rsqrt(rms + 1e-6)``
FAC_MOM_MULT_EPS            1e-6    non-factored ``m * (v + 1e-6)**-0.5`` (HEAD only)
NORMALIZER_EPS              1e-5    second-moment feature normalizer
==========================  ======  ===========================================================

VeLO (``research/general_lopt/hyper_v2.py``) adds the constants below the first group.
"""

FACTORED_GRAD_SQ_EPS = 1e-30
SAFE_RSQRT_FLOOR = 1e-9
ROW_COL_MEAN_EPS = 1e-9
DIAG_PRECOND_EPS = 1e-9
ROW_COL_FEATURE_EPS = 1e-8
RMS_FEATURE_EPS = 1e-6
FAC_MOM_MULT_EPS = 1e-6
NORMALIZER_EPS = 1e-5

#: Timescales of the ``tanh(t / s - 1)`` training-step embedding.
TIME_FEATURE_TIMESCALES = (1, 3, 10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000)

#: The accumulators' decays upstream's learned optimizers default to (``AdafacMLPLOpt`` and
#: ``HyperV2`` constructor defaults; the Celo authors' factory keeps them for Celo).
UPSTREAM_DECAYS = {
    "initial_momentum_decays": (0.9, 0.99, 0.999),
    "initial_rms_decays": (0.999,),
    "initial_adafactor_decays": (0.9, 0.99, 0.999),
}
#: The hyperparameters that name the three accumulators' decays, in upstream's order.
DECAY_KEYS = tuple(UPSTREAM_DECAYS)

#: Rows of the per-parameter MLP evaluated at once by the eager path (bounds activation memory).
MLP_CHUNK_ROWS = 1 << 16

# --- VeLO (HyperV2) ------------------------------------------------------------------------
#: Gradients are clipped to +-1000 before everything else.
VELO_GRAD_CLIP = 1000.0
#: The ``clip(g, -0.1, 0.1)`` per-parameter feature.
VELO_GRAD_CLIP_FEATURE = 0.1
#: ``rsqrt(max(1e-9, mean(p^2)))``, the LSTM features' per-tensor normalization.
VELO_NORM_MULT_FLOOR = 1e-9
#: ``clip_log_abs(v) = 0.5 * clip(log(1e-8 + |10 v|), -5, 5)``.
VELO_LOG_ABS_EPS = 1e-8
VELO_LOG_ABS_SCALE = 10.0
VELO_LOG_ABS_CLIP = 5.0
#: ``param_scale = sqrt(mean(p^2) + 1e-9)``.
VELO_PARAM_SCALE_EPS = 1e-9
#: Loss features: ``max(1e-8, approx_max - running_min)``.
VELO_LOSS_DEN_FLOOR = 1e-8
#: The loss buffer: 10 moving averages, running minima start at 999999999999.
VELO_LOSS_BUFFER_SIZE = 10
VELO_LOSS_RUNNING_MIN_INIT = 999999999999.0
#: ``tanh(10 * (fraction_trained - c))`` for these c.
VELO_FRACTION_TIMESCALES = (0.03, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0, 1.1)
VELO_FRACTION_SHARPNESS = 10.0
#: Per-tensor MLP weights: ``ff_mult * mean_k(controls[k] * bank[k])``.
VELO_FF_MULT = 100.0
#: Upstream's prefab averages gradients over ceil(N / 150000) steps above this horizon.
VELO_MAX_TRAINING_STEPS = 150_000
#: Elements per chunk of VeLO's eager per-parameter pass (its [chunk, 30] feature matrix is
#: 32 MB at 2^18; larger tensors take two passes: sums of squares, then features and MLP).
VELO_CHUNK_ELEMENTS = 1 << 18

# --- Celo and Celo-Adam (amoudgl/celo) -----------------------------------------------------
#: ``lr_mult = 0.1 * exp(h W_s + b_s)``, the learned schedule.
CELO_LR_MULT_SCALE = 0.1
#: Celo's per-parameter MLP weights are ``mean_k(controls[k] * bank[k])``: no x100.
CELO_FF_MULT = 1.0
#: Celo-Adam: ``sqrt(v_hat + 1e-10)`` under the epsilon.
CELO_ADAM_SQRT_EPS = 1e-10
