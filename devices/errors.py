"""The project's one exception type.

It lives in `devices`, the bottom of the dependency chain
(devices <- runtime <- exporters <- projectable_edge), so every layer, the
torch-free runtime included, can raise it. Users import it from any package:
`projectable_edge.ProjectableEdgeError` and `runtime.ProjectableEdgeError` are
the same class.
"""


class ProjectableEdgeError(Exception):
    """An error the user can fix: the message names what is wrong and how to fix it."""
