"""What an evaluation shows besides numbers: matplotlib figures and `Table`s. Returned among an
evaluation's metrics, they go to TensorBoard and Weights & Biases (`engine.metrics`), never to
metrics.jsonl, which keeps numbers only; their PNG and JSONL files stay in the workdir."""

import dataclasses
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class Table:
  """Rows of values under named columns, e.g. sampled answers with their rewards."""
  columns: tuple[str, ...]
  rows: Sequence[tuple]

  def markdown(self) -> str:
    """A Markdown table (TensorBoard's text dashboard renders it); '|' in a cell escaped."""
    def cell(value) -> str:
      text = f'{value:.4g}' if isinstance(value, float) else str(value)
      return text.replace('|', '\\|').replace('\n', ' ')
    lines = [self.columns, ['---'] * len(self.columns), *self.rows]
    return '\n'.join('| ' + ' | '.join(map(cell, line)) + ' |' for line in lines)
