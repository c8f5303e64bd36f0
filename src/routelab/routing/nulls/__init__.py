"""Null distributions of router logits: the p-values of the ``bh`` and ``hc`` rules.

Importing this package registers every kind in :data:`NULL_KINDS`, in the order of :data:`KIND_MODULES`
(the order the schema and the messages list them): ``kde`` and ``empirical`` (:mod:`.tabulated`),
``student_t`` and ``gmm`` (:mod:`.parametric`), ``per_expert`` (:mod:`.per_expert`), ``gaussian``
(:mod:`.gaussian`).
"""

import importlib

KIND_MODULES = ("tabulated", "parametric", "per_expert", "gaussian")
for _module in KIND_MODULES:  # registered as imported: the order is this list's, not the import sorter's
    importlib.import_module(f"{__name__}.{_module}")

from routelab.routing.nulls.base import (  # noqa: E402
    NULL_KINDS,
    Null,
    NullKind,
    NullMismatchError,
    calibrated_kinds,
    fit_null,
    load_null,
    register_null,
)
from routelab.routing.nulls.gaussian import GaussianNull  # noqa: E402
from routelab.routing.nulls.interpolation import (  # noqa: E402
    UniformSegments,
    evenly_spaced,
    interpolate,
    interpolate_rows,
)
from routelab.routing.nulls.parametric import (  # noqa: E402
    Mixture,
    fit_gmm,
    fit_gmm_null,
    fit_student_t,
    fit_student_t_null,
)
from routelab.routing.nulls.per_expert import PerExpertNull, fit_per_expert_null  # noqa: E402
from routelab.routing.nulls.tabulated import (  # noqa: E402
    TabulatedNull,
    ecdf_table,
    fit_empirical_null,
    fit_kde_layer,
    fit_kde_null,
    quantile_ranks,
)

__all__ = ["KIND_MODULES", "NULL_KINDS", "GaussianNull", "Mixture", "Null", "NullKind", "NullMismatchError",
           "PerExpertNull", "TabulatedNull", "UniformSegments", "calibrated_kinds", "ecdf_table", "evenly_spaced",
           "fit_empirical_null", "fit_gmm", "fit_gmm_null", "fit_kde_layer", "fit_kde_null", "fit_null",
           "fit_per_expert_null", "fit_student_t", "fit_student_t_null", "interpolate", "interpolate_rows",
           "load_null", "quantile_ranks", "register_null"]
