"""What every figure of the CLI and the report shares: PNG bytes of a matplotlib figure, token-count axis labels.

matplotlib is imported inside the functions: the commands that draw nothing never load it.
"""

from __future__ import annotations

import io


def png(figure) -> bytes:
    """The figure as PNG bytes (no display, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return buffer.getvalue()


def token_formatter():
    """Axis labels for token counts: 3.2M, 500k."""
    from matplotlib.ticker import FuncFormatter

    def tokens(value: float, _position) -> str:
        for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
            if abs(value) >= size:
                return f"{value / size:g}{suffix}"
        return f"{value:g}"

    return FuncFormatter(tokens)
