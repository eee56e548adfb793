"""Short, varied prompts the teacher source starts its samples from (plain-text openers and chat requests).

Deliberately generic and spread over genres, so the samples cover what the model does rather than
one domain; none is taken from an evaluation text.
"""

TEXT_OPENERS = (
    "The", "In", "It was", "Once upon a time", "When I", "According to", "The history of", "Today,",
    "Dear", "Chapter 1", "Introduction", "Abstract:", "Q:", "Step 1:", "Ingredients:", "Note:",
    "def ", "import ", "# ", "<html>", "SELECT", "Breaking news:", "Scientists have", "In 1987,",
    "My favourite", "If you want to", "There are many", "The following", "Yesterday", "Why do",
    "How to", "A recent study", "The city of", "He said", "She looked", "We", "Once", "First,",
    "In mathematics,", "The weather", "Welcome to", "Thank you for", "Product description:", "Review:",
    "The president", "Water is", "Music", "The best way to",
)

CHAT_REQUESTS = (
    "Write a short story about a lighthouse keeper.", "Explain how photosynthesis works.",
    "What are the benefits of regular exercise?", "Write a Python function that reverses a string.",
    "Summarize the causes of the First World War.", "Give me three tips for learning a new language.",
    "What is the difference between weather and climate?", "Write a haiku about autumn.",
    "How do I make a cup of tea?", "Explain what a neural network is to a child.",
    "List five famous painters and one work by each.", "What is 17 times 23? Show your steps.",
    "Write an email asking for a day off.", "Describe the water cycle.",
    "Why is the sky blue?", "Suggest a name for a bakery and explain it.",
    "What are prime numbers?", "Translate 'good morning' into French and Spanish.",
    "Write a limerick about a cat.", "How does a bicycle stay upright?",
    "Compare cats and dogs as pets.", "Explain recursion with an example.",
    "What should I pack for a weekend hike?", "Tell me a fun fact about octopuses.",
    "Write a product review for a pair of headphones.", "How do vaccines work?",
    "Plan a three-day trip to Rome.", "What is the capital of Australia, and why is it not Sydney?",
    "Sort these numbers: 42, 7, 19, 3, 88.", "Write a short poem about the sea.",
    "Explain the rules of chess briefly.", "What is inflation?",
)

KINDS = ("bos", "text", "chat")  # where a sample starts: the BOS token alone, a plain-text opener, a chat request
