"""MLflow "models from code" entry: logged instead of a pickled object, so loading runs this file."""

import mlflow.models

from kdsec.pyfunc_model import StudentModel

mlflow.models.set_model(StudentModel())
