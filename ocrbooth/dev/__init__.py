"""The development stack: an embedded Kafka-protocol broker and S3 server (`ocrbooth dev`) and the demo."""
