"""defectops building blocks: plain Python + torch + numpy + faiss (no prefect, mlflow, boto3 or dvc).

Importing the package first makes torchvision (and so timm) importable with a CPU torch
(see components.torchvision_compat); every module below relies on it.
"""

from components import torchvision_compat  # noqa: F401
