mod bench;
mod configs;
mod datasets;
mod reliability;
mod tiny_model;
