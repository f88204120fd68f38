pub mod easy_vqa;
