"""The models behind the extractors (image, text, audio encoders; face detection and the FER net; onnxruntime) and the weights digest."""
