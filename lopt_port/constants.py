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

#: Rows of the per-parameter MLP evaluated at once by the eager path (bounds activation memory).
MLP_CHUNK_ROWS = 1 << 16
