mod reliability;
mod tiny_model;
