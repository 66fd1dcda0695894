"""The package's layers: data flows one way, so no module imports one of a higher layer."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'rlhf_jax'
# Lowest first; a module may import its own layer's and lower layers' modules only.
LAYERS = [('errors', 'storage', 'losses', 'parallel', 'tpu'), ('models',), ('data',),
          ('sampling',), ('playground',), ('rewards',), ('evals', 'analysis'), ('config',),
          ('engine',), ('context',), ('algorithms',),
          ('main', 'sweep', 'stages', 'launch', 'export', 'aot')]
LAYER = {part: i for i, parts in enumerate(LAYERS) for part in parts}


def part_of(module: str) -> str:
  """'rlhf_jax.models.hf' -> 'models' (a subpackage, or a top-level module)."""
  return module.split('.')[1]


def imports() -> dict[str, set[str]]:
  """Each module of the package: the rlhf_jax modules it imports."""
  found = {}
  for path in PACKAGE.rglob('*.py'):
    module = '.'.join(('rlhf_jax', *path.relative_to(PACKAGE).with_suffix('').parts))
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('rlhf_jax'):
        names |= ({node.module} if node.module != 'rlhf_jax' else
                  {f'rlhf_jax.{alias.name}' for alias in node.names})
      elif isinstance(node, ast.Import):
        names |= {a.name for a in node.names if a.name.startswith('rlhf_jax.')}
    found[module.removesuffix('.__init__')] = names
  return found


def test_every_part_has_a_layer():
  assert {part_of(m) for m in imports() if m != 'rlhf_jax'} == set(LAYER)


def test_no_module_imports_a_higher_layer():
  upward = sorted((module, name) for module, names in imports().items() if module != 'rlhf_jax'
                  for name in names if LAYER[part_of(name)] > LAYER[part_of(module)])
  assert not upward


def test_no_import_cycle_between_parts():
  edges = {}
  for module, names in imports().items():
    if module != 'rlhf_jax':
      edges.setdefault(part_of(module), set()).update(
          part_of(n) for n in names if part_of(n) != part_of(module))

  def reaches(start, goal, seen=()):
    return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n)))
               for n in edges.get(start, ()))
  assert not [part for part in edges if reaches(part, part)]
