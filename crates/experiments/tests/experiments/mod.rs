mod tiny_model;
