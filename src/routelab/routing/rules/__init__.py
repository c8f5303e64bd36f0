"""The routing rules, one module each; importing this package registers every one of them.

Each module holds one :class:`routelab.routing.contract.Router` subclass decorated with
:func:`~routelab.routing.contract.register_router` (see ``docs/extending.md``); the modules are found
by listing this folder, so adding a rule is adding its file.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
