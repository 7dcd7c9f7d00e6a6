"""Optional parts of pagedlm and the pip extra that installs each: importing one that is
missing raises MissingExtraError, whose message is the one line a user needs."""
from importlib import import_module


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


def import_extra(module, extra, purpose):
    """`module`, imported, or MissingExtraError saying `pip install 'pagedlm[extra]'`."""
    try:
        return import_module(module)
    except ImportError as err:
        raise MissingExtraError(f"{purpose} needs {module.split('.')[0]}, which is not installed: "
                                f"pip install 'pagedlm[{extra}]'") from err
