"""The embedded teachers' training recipes (the DDPM, the flow-matching and the text-to-image teacher, and the
fine-tune that makes a teacher update). DVC stages run them; a user's own teacher needs none of this.

May import: config, core, data, models, evaluation (the classifier that judges prompt adherence).
"""
