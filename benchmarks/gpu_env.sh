# Sourced by the GPU scripts: install the wheels in $WHEELS (.whl/ by default; if any) into $SITE and put them and
# the repository on PYTHONPATH, for a GPU machine without network that has torch and transformers but not aenum or
# peft (benchmarks/GPU_RUN.md).
PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
WHEELS=${WHEELS:-.whl}
export PYTHONUNBUFFERED=1
if compgen -G "$WHEELS/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHEELS"/*.whl \
        || { echo "$0: installing the wheels of $WHEELS failed" >&2; exit 2; }
    export PYTHONPATH=$SITE:$PWD
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
