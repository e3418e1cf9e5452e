"""The submitter side: choosing workers, driving jobs and TF clusters from the
node that submits them."""
