"""ocrbooth: a Kafka daemon for document OCR and DreamBooth fine-tuning."""

__version__ = "0.1.0"
