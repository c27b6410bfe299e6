"""Images as pixels: decoding PNG/JPEG/DICOM by magic number (with size caps), and the one preprocessing
function shared by training, evaluation and serving."""
