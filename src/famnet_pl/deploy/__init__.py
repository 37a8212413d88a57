"""Using a trained model: model directories (bundle.py), prediction on new clips (predict.py) and
export of the network (export.py). Below the LOSO runner, which writes model directories with
``--keep-models`` and trains final models (loso/final.py)."""
