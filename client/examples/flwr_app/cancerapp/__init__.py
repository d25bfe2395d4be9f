"""cancerapp: a Flower app that learns to tell malignant from benign breast tumours."""
