# Sourced by the experiment scripts: $PYTHON is the interpreter to run with. Unset, the CPU set-up
# (scripts/setup.sh: .venv with the CPU torch pin) runs first; set (e.g. PYTHON=python on a GPU machine with
# CUDA torch), that environment is used as it is and nothing is reinstalled.
if [ -z "${PYTHON:-}" ]; then
  bash scripts/setup.sh
  PYTHON=.venv/bin/python
fi
